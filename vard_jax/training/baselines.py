"""The DDPO and DRaFT/AlignProp update steps, built from a ``Trainer``'s parts.

They share everything with VARD's steps: the policy parametrisation (full or LoRA), the
sampler and rollout scan, the policy optimiser, the mesh shardings, state donation and the
skipping of non-finite updates. Only the loss differs (``vard_jax.algorithms.ddpo`` and
``vard_jax.algorithms.draft``); the epoch loop calls them through ``vard_jax.training.stages``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vard_jax.algorithms import ddpo, draft
from vard_jax.diffusion import rollout as rollout_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training.state import TrainState
from vard_jax.training.trainer import apply_policy_gradient


class Transitions(NamedTuple):
    """A sampled batch with what DDPO stores of it."""

    images: jax.Array  # [B, H, W, 3]
    x_t: jax.Array  # [B, T, ...] state entering each step
    x_prev: jax.Array  # [B, T, ...] state after each step
    log_prob: jax.Array  # [B, T] log p_old(x_prev | x_t), summed over dimensions
    context: jax.Array  # [B, L, D]


class DDPOSteps:
    """``sample(policy_params, ids, key) -> Transitions`` and the PPO ``update``."""

    def __init__(self, trainer):
        config = trainer.config
        self.trainer = trainer
        self.config = ddpo.DDPOConfig(
            clip_range=config.ddpo.clip_range, eta=config.sample.eta,
            guidance_scale=config.sample.guidance_scale,
            adv_clip=config.ddpo.adv_clip or None, reduce=config.ddpo.reduce)
        self.steps = trainer.ddpo_steps  # ddpo.stochastic_steps of the schedule
        pipeline, policy, schedule = trainer.pipeline, trainer.policy, trainer.schedule
        null_ids, num_steps = trainer.null_ids, trainer.num_steps
        loss_config = self.config
        optimizer = trainer.policy_optimizer
        # The micro-batch loops of the update and of the old log-probs, unrolled alike.
        unroll = rollout_lib.resolve_unroll(config.policy.scan_unroll)

        def sample(policy_params, frozen, reference_params, ids, key):
            context = pipeline.encode_ids(frozen["text_encoder"], ids)
            null_context = pipeline.encode_ids(frozen["text_encoder"], null_ids)
            x_T, noise = rollout_lib.sample_noise(key, ids.shape[0], num_steps,
                                                  pipeline.sample_shape)
            trajectory, _ = rollout_lib.rollout(
                policy.eps_fn, policy.unet(policy_params, reference_params), schedule, x_T,
                noise, context, null_context, eta=loss_config.eta,
                guidance_scale=loss_config.guidance_scale)
            return Transitions(images=pipeline.decode(frozen, trajectory.x0),
                               x_t=trajectory.x_t, x_prev=trajectory.x_prev,
                               log_prob=trajectory.log_prob, context=context)

        def update(state: TrainState, frozen, reference_params, batch: ddpo.DDPOBatch,
                   first: jax.Array):
            # batch: [A, M, ...] per transition (A micro-batches of M); one optimiser step on
            # the mean of the A micro-batches' gradients.
            def loss_fn(params, micro_batch):
                micro_batch = micro_batch._replace(null_context=batch.null_context)
                return ddpo.ddpo_loss(policy.eps_fn, policy.unet(params, reference_params),
                                      schedule, micro_batch, loss_config, first)

            loss, metrics, grads = ddpo.accumulated_gradient(
                loss_fn, state.policy_params, batch._replace(null_context=None), unroll)
            return apply_policy_gradient(optimizer, state, grads, loss, metrics)

        def sampling_log_prob(params, frozen, reference_params, batch: ddpo.DDPOBatch):
            # What ``ddpo.ddpo_loss`` computes as the new log-probs: the same function in the
            # same scan over the same micro-batch shapes, here at fixed parameters.
            del frozen
            unet = policy.unet(params, reference_params)

            def micro_step(carry, micro_batch):
                return carry, ddpo.transition_log_prob(
                    policy.eps_fn, unet, schedule, micro_batch.x_t, micro_batch.step_index,
                    micro_batch.x_prev, micro_batch.context, batch.null_context,
                    loss_config.eta, loss_config.guidance_scale, reduce=loss_config.reduce)

            return jax.lax.scan(micro_step, None, batch._replace(null_context=None),
                                unroll=unroll)[1]

        shardings = trainer.step_shardings()
        batch, replicated = shardings.batch, shardings.replicated
        self._sample = jax.jit(sample, in_shardings=(
            shardings.state.policy_params, shardings.frozen, shardings.reference, batch,
            replicated), out_shardings=Transitions(batch, batch, batch, batch, batch))
        # Micro-batches [A, M, ...]: the M transitions of each are split over ``data``.
        micro = mesh_lib.microbatch_sharding(trainer.mesh)
        self._micro_sharding = micro
        batch_sharding = ddpo.DDPOBatch(micro, micro, micro, micro, micro, micro, replicated)
        self._update = jax.jit(update, in_shardings=(
            shardings.state, shardings.frozen, shardings.reference, batch_sharding, replicated),
            out_shardings=(shardings.state, replicated), donate_argnums=0)
        self._log_prob = jax.jit(sampling_log_prob, in_shardings=(
            shardings.state.policy_params, shardings.frozen, shardings.reference,
            batch_sharding), out_shardings=micro)
        ddpo_config = config.ddpo
        # Per-prompt reward statistics across epochs (saved with each checkpoint).
        self.tracker = ddpo.PromptStatTracker(ddpo_config.stat_buffer, ddpo_config.stat_min_count)

    def sample(self, policy_params: Any, prompts: list[str], key: jax.Array) -> Transitions:
        trainer = self.trainer
        ids = trainer.put_batch(jnp.asarray(trainer.pipeline.tokenize(prompts)))
        return self._sample(policy_params, trainer.frozen, trainer.reference_params, ids,
                            trainer.put_key(key))

    def transitions(self, samples: list[Transitions], rewards: np.ndarray,
                    prompts: list[str]) -> ddpo.DDPOBatch:
        """Every stochastic step of every chain, chain-major, with advantages from the
        per-prompt statistics of ``self.tracker`` (which takes in ``rewards``)."""
        advantages = self.tracker.advantages(rewards, prompts)
        trajectory = rollout_lib.Trajectory(
            x_t=jnp.concatenate([s.x_t for s in samples]),
            x_prev=jnp.concatenate([s.x_prev for s in samples]),
            timesteps=None, noise=None,
            log_prob=jnp.concatenate([s.log_prob for s in samples]), x0=None)
        null_context = self.trainer.pipeline.encode_ids(self.trainer.frozen["text_encoder"],
                                                        self.trainer.null_ids)
        batch = ddpo.transitions_from_trajectory(
            trajectory, jnp.asarray(advantages), jnp.concatenate([s.context for s in samples]),
            null_context, steps=self.steps, reduce=self.config.reduce)
        return jax.tree_util.tree_map(np.asarray, jax.device_get(batch))  # minibatches on host

    def _place(self, batch: ddpo.DDPOBatch) -> ddpo.DDPOBatch:
        """Places a planned optimiser step's [A, M, ...] transitions (``transitions.take``)."""
        return batch._replace(**{name: mesh_lib.put(getattr(batch, name), self._micro_sharding)
                                 for name in batch._fields[:-1]})

    def sampling_log_probs(self, policy_params: Any, transitions: ddpo.DDPOBatch,
                           minibatches: list[np.ndarray]) -> tuple[ddpo.DDPOBatch, float]:
        """The transitions with ``old_log_prob`` recomputed at the sampling parameters.

        The rollout's log-probs come from another computation (the whole batch at one step,
        inside the scan) and differ from the training step's recomputation by float rounding
        that depends on the machine and the batch layout: up to 1e-5 relative, already ten
        times DDPO's clip range in a summed log-density. Each transition is therefore
        evaluated again with the update's own log-density function, on the first planned
        minibatch that holds it (same shapes and layout as its first update). The epoch's
        first optimiser step does not read these values: it uses its own log-probs
        (``ddpo.ddpo_loss``'s ``at_sampling_params``), so its ratio is 1 by construction.

        Args:
          policy_params: the parameters that sampled the transitions.
          transitions: the epoch's transitions, with the rollout's log-probs.
          minibatches: the planned optimiser steps, [A, M] index arrays, in update order
            (``ddpo.plan_updates``).

        Returns:
          (transitions with recomputed ``old_log_prob``, the largest |recomputed - rollout|).
        """
        trainer = self.trainer
        rollout = np.asarray(transitions.old_log_prob)
        old, done = rollout.copy(), np.zeros(rollout.shape, bool)
        for indices in minibatches:
            missing = ~done[indices]
            if not missing.any():
                continue
            values = self._log_prob(policy_params, trainer.frozen, trainer.reference_params,
                                    self._place(transitions.take(indices)))
            old[indices[missing]] = np.asarray(jax.device_get(values))[missing]
            done[indices] = True
        # Transitions in no minibatch (a dropped remainder) are never trained on.
        gap = float(np.max(np.abs(old - rollout))) if old.size else 0.0
        return transitions._replace(old_log_prob=old), gap

    def update(self, state: TrainState, batch: ddpo.DDPOBatch, first: bool = False):
        """One PPO optimiser step; ``first``: the state holds the sampling parameters (the
        epoch's first step), whose own log-probs are the old ones (``ddpo.ddpo_loss``)."""
        trainer = self.trainer
        return self._update(state, trainer.frozen, trainer.reference_params, self._place(batch),
                            mesh_lib.put(np.bool_(first), trainer.step_shardings().replicated))


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
        null_ids = trainer.null_ids
        loss_config, random_depth = self.config, self.random_depth
        optimizer = trainer.policy_optimizer

        def update(state: TrainState, frozen, reference_params, batch: dict, key):
            key_noise, key_depth = jax.random.split(key)
            context = pipeline.encode_ids(frozen["text_encoder"], batch["ids"])
            null_context = pipeline.encode_ids(frozen["text_encoder"], null_ids)
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
