"""DRaFT's epoch (and AlignProp's, DRaFT+'s): per batch, one update that samples with
gradients and backpropagates the differentiable, in-graph reward through the last K steps
(AlignProp: a random K), with an optional KL term (``vard_jax.algorithms.draft``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vard_jax import prompts as prompts_lib
from vard_jax.algorithms import draft
from vard_jax.diffusion import rollout as rollout_lib, sampler as sampler_lib
from vard_jax.training import faults
from vard_jax.training.epochs.base import Stage
from vard_jax.training.optimizers import apply_policy_gradient
from vard_jax.training.state import TrainState


class DraftSteps:
    """``update(state, prompts, key)``: one DRaFT-K / AlignProp / DRaFT+ step on fresh samples."""

    def __init__(self, trainer):
        config = trainer.config
        draft.check_reward(trainer.reward)
        if not trainer.reward.jittable:
            raise ValueError(f"draft needs a reward that runs inside jit; "
                             f"{trainer.reward.name!r} does not")
        self.trainer = trainer
        num_steps = trainer.num_steps
        self.random_depth = bool(config.draft.random_depth)
        self.config = draft.DraftConfig(
            grad_depth=min(config.draft.grad_depth, num_steps), beta=config.draft.beta,
            eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
            remat=config.policy.remat,
            unroll=rollout_lib.resolve_unroll(config.policy.scan_unroll),
            kl_on=config.policy.kl_on)
        pipeline, policy, schedule, reward = (trainer.pipeline, trainer.policy,
                                              trainer.policy_schedule, trainer.reward)
        loss_config, random_depth = self.config, self.random_depth
        optimizer = trainer.policy_optimizer

        def update(state: TrainState, frozen, reference_params, batch: dict, key):
            key_noise, key_depth = jax.random.split(key)
            context, null_context = sampler_lib.encode(pipeline, frozen["text_encoder"],
                                                       batch["ids"])
            x_T, noise = rollout_lib.sample_noise(key_noise, batch["ids"].shape[0], num_steps,
                                                  pipeline.sample_shape)
            inputs = draft.DraftInputs(context=context, null_context=null_context, x_T=x_T,
                                       noise=noise)

            def reward_fn(x0):
                return reward.score(pipeline.decode(frozen, x0), batch["reward_input"])

            reference = policy.reference_unet(reference_params)
            if random_depth:  # AlignProp: K ~ uniform on {1, ..., draft.grad_depth}
                depth = draft.sample_depth(key_depth, num_steps, 1, loss_config.grad_depth)
                loss, metrics, grads = draft.draft_value_and_grad_random_depth(
                    policy.eps_fn, state.policy_params, reference, schedule, inputs, reward_fn,
                    loss_config, depth,
                    model_params=lambda p: policy.unet(p, reference_params))
            else:
                (loss, metrics), grads = jax.value_and_grad(
                    lambda p: draft.draft_loss(policy.eps_fn, policy.unet(p, reference_params),
                                               reference, schedule, inputs, reward_fn,
                                               loss_config), has_aux=True)(state.policy_params)
            return apply_policy_gradient(optimizer, state, grads, loss, metrics,
                                         reward_queries=batch["ids"].shape[0])

        shardings = trainer.step_shardings()
        batch_sharding = {"ids": shardings.batch, "reward_input": shardings.batch}
        self._update = jax.jit(update, in_shardings=(
            shardings.state, shardings.frozen, shardings.reference, batch_sharding,
            shardings.replicated), out_shardings=(shardings.state, shardings.replicated),
            donate_argnums=0)

    def update(self, state: TrainState, prompts: list[str], key: jax.Array):
        trainer = self.trainer
        batch = {"ids": jnp.asarray(trainer.pipeline.tokenize(prompts)),
                 "reward_input": jnp.asarray(trainer.reward.prepare(prompts))}
        return self._update(state, trainer.frozen, trainer.reference_params,
                            trainer.put_batch(batch), trainer.put_key(key))


class DraftStage(Stage):
    def __init__(self, loop):
        super().__init__(loop)
        self.steps = DraftSteps(loop.trainer)

    def epoch(self, state: TrainState, epoch: int, key: jax.Array) -> tuple[TrainState, dict]:
        loop, config = self.loop, self.loop.config
        metrics = []
        for b in range(config.sample.batches_per_epoch):
            batch_prompts = prompts_lib.draw(loop.train_prompts, config.sample.batch_size,
                                             config.train.seed, 0, epoch, b)
            state, m = self.steps.update(state, batch_prompts, jax.random.fold_in(key, b))
            metrics.append(m)
        summary = faults.aggregate(metrics)
        faults.check_streak(state, config.train.max_nonfinite_in_a_row, epoch + 1, summary,
                            loop.last_checkpoint)
        summary["images"] = config.sample.batches_per_epoch * config.sample.batch_size
        return state, summary
