"""Builds everything a run needs from a config, and the jitted pure update steps.

``Trainer`` holds the static parts (pipeline, reward, value model, optimisers, mesh) and
exposes functions of explicit state:

* ``sample(policy_params, ids, key) -> Rollout``: images and the states of the chains;
* ``value_step(state, frozen, reference, batch) -> (state, metrics)`` and
  ``policy_step(state, frozen, reference, batch, key) -> (state, metrics)``: jitted once with
  explicit in/out shardings and the state donated (frozen weights are inputs, not constants).
  An update whose loss or gradient is not finite leaves the state as it was, except for the
  skip counters (``faults.keep_finite``).

The epoch loop (``vard_jax.training.loop``) calls them in order.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vard_jax.algorithms import ddpo, vard
from vard_jax.diffusion import ddim, rollout as rollout_lib, sampler as sampler_lib
from vard_jax.diffusion.schedule import make_ddim_schedule
from vard_jax.models import loader, policy as policy_lib, value as value_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.rewards import registry
from vard_jax.training import faults, stages
from vard_jax.training.state import (RewardStats, TrainState, learning_rate_schedule,
                                     make_optimizer)

EV_BUCKETS = 4  # explained variance of V is reported per quarter of the denoising steps


class Rollout(NamedTuple):
    images: jax.Array  # [B, H, W, 3] in [0, 1]
    states: jax.Array  # [B, T, ...] x_{i-1}: the state after each step (x_0 last)
    context: jax.Array  # [B, L, D]
    x0: jax.Array  # [B, ...]


class StepShardings(NamedTuple):
    state: Any  # TrainState of shardings
    frozen: Any  # text encoder / VAE params
    reference: Any  # the pretrained UNet params
    batch: Any  # split over the data axis
    replicated: Any


def explained_variance(targets: np.ndarray, predictions: np.ndarray) -> float:
    """1 - Var(targets - predictions) / Var(targets); NaN when the targets do not vary."""
    if targets.size == 0:
        return float("nan")
    variance = float(np.var(targets))
    if variance < 1e-12:
        return float("nan")
    return 1.0 - float(np.var(targets - predictions)) / variance


def value_update(value_apply: Any, optimizer: optax.GradientTransformation, state: TrainState,
                 batch: dict, aux: Any) -> tuple[TrainState, dict]:
    """One value regression step (MSE to the batch's targets) with non-finite skipping.

    ``batch``: states [N, ...], timesteps [N], context [N, L, D], targets [N]; ``aux`` the
    value model's extra inputs. The body of ``Trainer.value_step``, shared with
    experiments/sd_memory.py.
    """
    def loss_fn(params):
        return vard.value_loss(value_apply, params, batch["states"], batch["timesteps"],
                               batch["context"], batch["targets"], aux)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.value_params)
    updates, opt_state = optimizer.update(grads, state.value_opt_state, state.value_params)
    new_state = state.replace(value_params=optax.apply_updates(state.value_params, updates),
                              value_opt_state=opt_state, value_updates=state.value_updates + 1)
    grad_norm = optax.global_norm(grads)
    state, skipped = faults.keep_finite(state, new_state, "value", loss, grad_norm)
    return state, {"value_loss": loss, "value_grad_norm": grad_norm, **skipped}


def apply_policy_gradient(optimizer: optax.GradientTransformation, state: TrainState, grads: Any,
                          loss: jax.Array, metrics: dict, reward_queries: int = 0):
    """One optimiser step of the policy (skipped when loss or gradient is not finite)."""
    updates, opt_state = optimizer.update(grads, state.policy_opt_state, state.policy_params)
    new_state = state.replace(
        policy_params=optax.apply_updates(state.policy_params, updates),
        policy_opt_state=opt_state, policy_updates=state.policy_updates + 1,
        reward_queries=state.reward_queries + reward_queries)
    grad_norm = optax.global_norm(grads)
    state, skipped = faults.keep_finite(state, new_state, "policy", loss, grad_norm)
    return state, {**metrics, "policy_loss": loss, "policy_grad_norm": grad_norm, **skipped}


def policy_inputs(key: jax.Array, context: jax.Array, null_context: jax.Array, num_steps: int,
                  sample_shape: tuple, train_fraction: float, value_aux: Any) -> vard.PolicyInputs:
    """The rollout's inputs of one policy update: starting noise and per-step noise from one
    half of ``key``, the trained-step mask from the other."""
    key_noise, key_mask = jax.random.split(key)
    x_T, noise = rollout_lib.sample_noise(key_noise, context.shape[0], num_steps, sample_shape)
    return vard.PolicyInputs(context=context, null_context=null_context, x_T=x_T, noise=noise,
                             step_mask=vard.step_mask(key_mask, num_steps, train_fraction),
                             value_aux=value_aux)


def policy_update(policy: policy_lib.PolicyModel, value_apply: Any,
                  optimizer: optax.GradientTransformation, schedule: Any,
                  loss_config: vard.PolicyLossConfig, state: TrainState, reference_params: Any,
                  inputs: vard.PolicyInputs, last_step_reward: Any = None
                  ) -> tuple[TrainState, dict]:
    """One VARD policy step (``vard.policy_loss`` over the differentiable rollout, optimiser
    on the trainable parameters) with non-finite skipping. The body of
    ``Trainer.policy_step``, shared with experiments/sd_memory.py."""
    def loss_fn(params):
        return vard.policy_loss(policy.eps_fn, policy.unet(params, reference_params),
                                policy.reference_unet(reference_params), value_apply,
                                state.value_params, schedule, inputs, loss_config,
                                last_step_reward)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.policy_params)
    return apply_policy_gradient(optimizer, state, grads, loss, metrics)


class Optimizers(NamedTuple):
    policy_learning_rate: optax.Schedule  # rate by policy update count
    policy: optax.GradientTransformation
    value_learning_rate: optax.Schedule  # rate by value update count
    value: optax.GradientTransformation


def make_optimizers(config, policy_updates_per_epoch: int) -> Optimizers:
    """The policy and value optimisers (and their rate schedules) of a run whose policy makes
    ``policy_updates_per_epoch`` optimiser steps an epoch (``stages.policy_updates_per_epoch``)."""
    peak = config.policy.learning_rate
    if config.algorithm == "ddpo" and config.ddpo.learning_rate > 0.0:
        peak = config.ddpo.learning_rate  # DDPO's own rate (ddpo-pytorch's default)
    policy_lr = learning_rate_schedule(
        peak, config.policy.warmup_steps,
        config.train.epochs * policy_updates_per_epoch, config.policy.lr_schedule)
    value_lr = learning_rate_schedule(config.value.learning_rate, config.value.warmup_steps, 0,
                                      "constant")
    return Optimizers(
        policy_lr, make_optimizer(policy_lr, config.policy.weight_decay, config.policy.grad_clip),
        value_lr, make_optimizer(value_lr, config.value.weight_decay, config.value.grad_clip))


class Trainer:
    def __init__(self, config, devices=None):
        self.config = config
        self.mesh = mesh_lib.make_mesh(config, devices)
        loaded = loader.load(config)
        self.pipeline = loaded.pipeline
        self.frozen = {k: v for k, v in loaded.params.items() if k != "unet"}
        self.reference_params = loaded.params["unet"]
        self.policy = policy_lib.make(config.policy, self.pipeline)
        self.reward = registry.build(config.reward.name, loaded.reward_context)
        self.reward_evaluator = registry.RewardEvaluator(self.reward)
        extra = [n.strip() for n in config.reward.eval_extra.split(",") if n.strip()]
        self.eval_evaluators = {n: registry.RewardEvaluator(registry.build(n, loaded.reward_context))
                                for n in extra if n != self.reward.name}
        for flag in ("reward.direct_last_step", "value.log_grad_alignment"):
            section, name = flag.split(".")
            if config[section][name] and not self.reward.differentiable:
                raise ValueError(f"{flag} needs a differentiable reward; {self.reward.name!r} "
                                 f"is not (set {flag}=False)")
        self.num_steps = config.sample.num_steps
        self.schedule = make_ddim_schedule(self.pipeline.schedule, self.num_steps)
        # The differentiated rollouts (VARD's policy step, DRaFT) may use the straight-through
        # derivative of the x0 clip; sampling and DDPO's densities use ``self.schedule``.
        self.policy_schedule = self.schedule.replace(
            clip_gradient=config.policy.clip_x0_gradient)
        self.null_ids = jnp.asarray(self.pipeline.tokenize([""]))
        self.value_model = self._make_value_model()
        # The denoising steps DDPO stores and trains (None for the other algorithms).
        self.ddpo_steps = (ddpo.stochastic_steps(self.schedule, config.sample.eta)
                           if config.algorithm == "ddpo" else None)
        self.policy_updates_per_epoch = stages.policy_updates_per_epoch(
            config, 0 if self.ddpo_steps is None else len(self.ddpo_steps),
            self.mesh.shape["data"])
        # The rates by update count (the Loop logs those of each epoch's last updates).
        optimizers = make_optimizers(config, self.policy_updates_per_epoch)
        self.policy_learning_rate, self.policy_optimizer = (optimizers.policy_learning_rate,
                                                            optimizers.policy)
        self.value_learning_rate, self.value_optimizer = (optimizers.value_learning_rate,
                                                          optimizers.value)
        self.loss_config = vard.PolicyLossConfig(
            beta=config.policy.beta, grad_depth=config.policy.grad_depth, eta=config.sample.eta,
            guidance_scale=config.sample.guidance_scale, remat=config.policy.remat,
            python_loop=config.sample.python_loop,
            unroll=rollout_lib.resolve_unroll(config.policy.scan_unroll),
            kl_on=config.policy.kl_on,
            trained_steps=vard.trained_steps(self.num_steps, config.policy.train_fraction))
        self._replicated = mesh_lib.replicated(self.mesh)
        self._batch = mesh_lib.batch_sharding(self.mesh)
        # The frozen weights are placed on the mesh once (sharded like parameters).
        self.frozen = mesh_lib.put(self.frozen, mesh_lib.param_shardings(self.mesh, self.frozen))
        self.reference_params = mesh_lib.put(
            self.reference_params, mesh_lib.param_shardings(self.mesh, self.reference_params))
        self._build_functions()

    def reference_x0_hat(self, reference_params: Any, x: jax.Array, timesteps: jax.Array,
                         context: jax.Array) -> jax.Array:
        """The frozen reference model's conditional one-step prediction x0_hat(x_t),
        differentiable in ``x`` (what the conv_x0 and reward_init values read); the final
        state (t < 0) is already clean and passes through."""
        t = jnp.maximum(timesteps, 0)
        eps = self.pipeline.eps_fn(reference_params, x, t, context)
        a = jnp.asarray(self.schedule.alphas_cumprod)[t].reshape((-1,) + (1,) * (x.ndim - 1))
        x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        # Clipped like the sampler's x0 (clip_sample, the shapes world's pixels; identity for
        # Stable Diffusion's latents): the early steps' predictions are otherwise
        # ~1/sqrt(alpha_bar) ~ 100 times too large. The derivative follows
        # policy.clip_x0_gradient.
        return ddim.clip_x0(self.policy_schedule,
                            jnp.where((timesteps < 0).reshape(a.shape), x, x0))

    def _make_value_model(self) -> value_lib.ValueModel:
        config, pipeline = self.config, self.pipeline
        context_shape = (pipeline.max_length, pipeline.unet.cross_attention_dim)
        if config.value.arch == "conv":
            return value_lib.conv_value(pipeline.sample_shape, context_shape, config.value.width)

        def x0_hat(aux, x, timesteps, context):
            return self.reference_x0_hat(aux["reference"], x, timesteps, context)

        if config.value.arch == "conv_x0":
            return value_lib.conv_x0_value(pipeline.sample_shape, context_shape,
                                           config.value.width, x0_hat)
        if self.reward.backbone is None:
            raise ValueError(f"value.arch = 'reward_init' needs a reward that is a network "
                             f"(clip_alignment, pickscore, aesthetic); {self.reward.name!r} is not")
        _, backbone_params, score_fn = self.reward.backbone

        def decode(aux, x0):
            return pipeline.decode(aux["frozen"], x0)

        return value_lib.reward_init_value(score_fn, backbone_params, x0_hat, decode)

    @property
    def value_needs_reward_ids(self) -> bool:
        return self.config.value.arch == "reward_init"

    def value_aux(self, stats: RewardStats, frozen: dict, reference_params: Any,
                  reward_ids: Any) -> dict:
        """Inputs of the value model beyond (x_t, t, c): the reference UNet for the x0_hat
        values, with the reward's prompt ids and statistics for reward_init; empty for conv."""
        if self.config.value.arch == "conv_x0":
            return {"reference": reference_params}
        if not self.value_needs_reward_ids:
            return {}
        return {"reward_ids": reward_ids, "reward_mean": stats.mean, "reward_std": stats.std,
                "reference": reference_params, "frozen": frozen}

    # --- state -----------------------------------------------------------------------------
    def initial_policy_params(self) -> Any:
        """The trainable parameters of the pretrained policy (unplaced): a float32 copy of the
        UNet, or LoRA adapters with B = 0."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.train.seed), 2)
        return self.policy.init(self.reference_params, key)

    def pretrained_policy_params(self) -> Any:
        """``initial_policy_params`` placed like a trained policy (the jitted functions' input)."""
        params = self.initial_policy_params()
        return mesh_lib.put(params, mesh_lib.param_shardings(self.mesh, params))

    def _initial_state(self) -> TrainState:
        key = jax.random.PRNGKey(self.config.train.seed)
        key, value_key = jax.random.split(key)
        value_params = self.value_model.init(value_key)
        policy_params = self.initial_policy_params()
        return TrainState.create(policy_params, self.policy_optimizer, value_params,
                                 self.value_optimizer, key)

    def init_state(self) -> TrainState:
        """The placed initial state; the policy starts equal to the reference."""
        state = self._initial_state()
        return mesh_lib.put(state, self.state_shardings(state))

    def state_shardings(self, state: Any) -> Any:
        return mesh_lib.param_shardings(self.mesh, state)

    # --- jitted functions ----------------------------------------------------------------------
    def _encode(self, ids):
        return self.pipeline.encode_ids(self.frozen["text_encoder"], ids)

    def _build_functions(self) -> None:
        pipeline, policy_schedule, config = self.pipeline, self.policy_schedule, self.config
        shape = pipeline.sample_shape
        value_apply = self.value_model.apply
        reward = self.reward
        abstract_state = jax.eval_shape(self.init_state_abstract)
        state_sharding = self.state_shardings(abstract_state)
        self.abstract_state = abstract_state

        sampler_spec = sampler_lib.SamplerSpec(self.num_steps, config.sample.eta,
                                               config.sample.guidance_scale,
                                               config.sample.python_loop)

        policy = self.policy

        def sample(policy_params, frozen, reference_params, ids, key):
            samples = sampler_lib.sample(pipeline, frozen,
                                         policy.unet(policy_params, reference_params), ids, key,
                                         sampler_spec, eps_fn=policy.eps_fn)
            return Rollout(images=samples.images, states=samples.trajectory.x_prev,
                           context=samples.context, x0=samples.trajectory.x0)

        def value_predict(value_params, stats, frozen, reference_params, batch):
            aux = self.value_aux(stats, frozen, reference_params, batch.get("reward_ids"))
            return value_apply(value_params, batch["states"], batch["timesteps"],
                               batch["context"], aux)

        def value_gradient_cosines(value_params, stats, frozen, reference_params, batch):
            # Per state: cos(dV/dx_t, d r_std(decode(x0_hat(x_t)))/dx_t); see
            # value_gradient_alignment (differentiable rewards only).
            aux = self.value_aux(stats, frozen, reference_params, batch.get("reward_ids"))
            t, context = batch["timesteps"], batch["context"]

            def value(x):
                return jnp.sum(value_apply(value_params, x, t, context, aux))

            def standardised_reward(x):
                images = pipeline.decode(frozen, self.reference_x0_hat(reference_params, x, t,
                                                                       context))
                return jnp.sum(stats.standardise(reward.score(images, batch["reward_input"])))

            g_v = jax.grad(value)(batch["states"]).reshape(t.shape[0], -1)
            g_r = jax.grad(standardised_reward)(batch["states"]).reshape(t.shape[0], -1)
            norms = jnp.linalg.norm(g_v, axis=1) * jnp.linalg.norm(g_r, axis=1)
            return jnp.sum(g_v * g_r, axis=1) / jnp.maximum(norms, 1e-30)

        def value_step(state: TrainState, frozen: dict, reference_params, batch: dict):
            aux = self.value_aux(state.reward_stats, frozen, reference_params,
                                 batch.get("reward_ids"))

            return value_update(value_apply, self.value_optimizer, state, batch, aux)

        def policy_step(state: TrainState, frozen: dict, reference_params, batch: dict, key):
            context = pipeline.encode_ids(frozen["text_encoder"], batch["ids"])
            null_context = pipeline.encode_ids(frozen["text_encoder"], self.null_ids)
            inputs = policy_inputs(
                key, context, null_context, self.num_steps, shape, config.policy.train_fraction,
                self.value_aux(state.reward_stats, frozen, reference_params,
                               batch.get("reward_input")))
            last_step_reward = None
            if config.reward.direct_last_step:
                stats = state.reward_stats

                def last_step_reward(x0):
                    images = pipeline.decode(frozen, x0)
                    return stats.standardise(reward.score(images, batch["reward_input"]))

            return policy_update(policy, value_apply, self.policy_optimizer, policy_schedule,
                                 self.loss_config, state, reference_params, inputs,
                                 last_step_reward)

        replicated, batch = self._replicated, self._batch
        frozen_sharding = mesh_lib.param_shardings(self.mesh, self.frozen)
        reference_sharding = mesh_lib.param_shardings(self.mesh, self.reference_params)
        policy_sharding = state_sharding.policy_params
        self._step_shardings = StepShardings(state_sharding, frozen_sharding, reference_sharding,
                                             batch, replicated)
        self.sample = jax.jit(sample, in_shardings=(policy_sharding, frozen_sharding,
                                                    reference_sharding, batch, replicated),
                              out_shardings=Rollout(batch, batch, batch, batch))
        self.value_predict = jax.jit(value_predict, in_shardings=(
            state_sharding.value_params, state_sharding.reward_stats, frozen_sharding,
            reference_sharding, batch), out_shardings=batch)
        self.value_gradient_cosines = jax.jit(value_gradient_cosines, out_shardings=batch)
        self.value_step = jax.jit(value_step, in_shardings=(
            state_sharding, frozen_sharding, reference_sharding, batch),
            out_shardings=(state_sharding, replicated), donate_argnums=0)
        policy_batch_sharding = {"ids": batch}
        if config.reward.direct_last_step or self.value_needs_reward_ids:
            policy_batch_sharding["reward_input"] = batch
        self.policy_step = jax.jit(policy_step, in_shardings=(
            state_sharding, frozen_sharding, reference_sharding, policy_batch_sharding, replicated),
            out_shardings=(state_sharding, replicated), donate_argnums=0)

    def step_shardings(self) -> "StepShardings":
        """The shardings of the update steps' inputs (for steps built elsewhere, e.g. the
        baselines in ``vard_jax.training.baselines``)."""
        return self._step_shardings

    def init_state_abstract(self) -> TrainState:
        """Like ``init_state`` without placement (for eval_shape)."""
        return self._initial_state()

    # --- host-side helpers used by the loop ---------------------------------------------------
    def put_batch(self, tree: Any) -> Any:
        """Places host values (the whole batch, the same on every process) split over ``data``;
        each process copies only the rows its own devices hold."""
        return mesh_lib.put(tree, self._batch)

    def put_key(self, key: jax.Array) -> jax.Array:
        """A PRNG key replicated over the mesh, as the loop's keys (split from the state's)
        are: a key placed elsewhere (``jax.random.PRNGKey(0)`` on the default device) has a
        different type, so the steps would be traced and compiled a second time for it."""
        return mesh_lib.put(key, self._replicated)

    def rollout_batch(self, policy_params, prompts: list[str], key) -> Rollout:
        ids = self.put_batch(jnp.asarray(self.pipeline.tokenize(prompts)))
        return self.sample(policy_params, self.frozen, self.reference_params, ids,
                           self.put_key(key))

    def rollouts_with_rewards(self, policy_params, prompt_batches: list[list[str]], key,
                              check_images=None) -> tuple[list[Rollout], np.ndarray]:
        """Rollouts of the policy for each batch of prompts (batch b with key fold_in(key, b))
        and their rewards, scored on the host: (rollouts, rewards [sum of batch sizes]).
        ``check_images(images)`` sees each batch's host images before the reward does."""
        rollouts, rewards = [], []
        for b, prompts in enumerate(prompt_batches):
            rollout = self.rollout_batch(policy_params, prompts, jax.random.fold_in(key, b))
            images = mesh_lib.to_host(rollout.images)  # the whole batch, on every process
            if check_images is not None:
                check_images(images)
            values, _ = self.reward_evaluator(images, prompts)
            rollouts.append(rollout)
            rewards.append(values)
        return rollouts, np.concatenate(rewards)

    def policy_update(self, state: TrainState, prompts: list[str], key):
        batch = {"ids": jnp.asarray(self.pipeline.tokenize(prompts))}
        if self.config.reward.direct_last_step or self.value_needs_reward_ids:
            batch["reward_input"] = jnp.asarray(self.reward.prepare(prompts))
        return self.policy_step(state, self.frozen, self.reference_params, self.put_batch(batch),
                                self.put_key(key))

    def value_dataset(self, rollouts: list[Rollout], rewards: np.ndarray, stats: RewardStats,
                      prompts: list[str]) -> dict:
        """Every state after a step, labelled with its chain's standardised reward (numpy)."""
        states = np.concatenate([mesh_lib.to_host(r.states) for r in rollouts])  # [N, T, ...]
        context = np.concatenate([mesh_lib.to_host(r.context) for r in rollouts])  # [N, L, D]
        n, t = states.shape[:2]
        targets = np.asarray(stats.standardise(jnp.asarray(rewards)))  # [N]
        prev_timesteps = np.asarray(self.schedule.prev_timesteps)  # [T]
        dataset = {
            "states": states.reshape((n * t,) + states.shape[2:]),
            "timesteps": np.tile(prev_timesteps, n).astype(np.int32),
            "step_index": np.tile(np.arange(t), n),
            "chain": np.repeat(np.arange(n), t),
            "context": context,
            "targets": np.repeat(targets, t).astype(np.float32),
            "rewards": np.repeat(np.asarray(rewards, np.float32), t),  # raw, for replay
        }
        if self.value_needs_reward_ids:
            dataset["reward_ids"] = np.asarray(self.reward.prepare(prompts))  # per chain
        return dataset

    @staticmethod
    def replay_dataset(datasets: list[dict], stats: RewardStats) -> dict:
        """The ``value_dataset``s of several epochs as one, every target standardised again
        with ``stats`` (the current statistics: V predicts the reward in today's units)."""
        merged: dict[str, list] = {}
        chains = 0
        for dataset in datasets:
            for key, value in dataset.items():
                merged.setdefault(key, []).append(value + chains if key == "chain" else value)
            chains += dataset["context"].shape[0]
        out = {key: np.concatenate(values) for key, values in merged.items()}
        out["targets"] = np.asarray(stats.standardise(jnp.asarray(out["rewards"])), np.float32)
        return out

    def _value_batch(self, dataset: dict, idx: np.ndarray) -> dict:
        chains = dataset["chain"][idx]
        batch = {"states": dataset["states"][idx], "timesteps": dataset["timesteps"][idx],
                 "context": dataset["context"][chains], "targets": dataset["targets"][idx]}
        if "reward_ids" in dataset:
            batch["reward_ids"] = dataset["reward_ids"][chains]
        return self.put_batch(batch)

    def _per_state(self, function, state: TrainState, dataset: dict,
                   extra: Optional[dict] = None) -> np.ndarray:
        """``function(value_params, reward_stats, frozen, reference_params, batch) -> [B]`` over
        every state of ``dataset``, in batches of ``value.batch_size`` (the last one padded to
        the same size, split over the data axis); ``extra`` holds more per-state inputs of the
        batch. Host values [N]."""
        data_axis = self.mesh.shape[mesh_lib.DATA]
        total = dataset["states"].shape[0]
        chunk = max(min(self.config.value.batch_size, total), 1)
        size = chunk + (-chunk) % data_axis  # every batch padded to one shape: one program
        values = []
        for start in range(0, total, chunk):
            idx = np.arange(start, min(start + chunk, total))
            idx_padded = np.concatenate([idx, np.repeat(idx[-1:], size - len(idx))])
            batch = self._value_batch(dataset, idx_padded)
            for name, per_state in (extra or {}).items():
                batch[name] = self.put_batch(per_state[idx_padded])
            values.append(mesh_lib.to_host(function(
                state.value_params, state.reward_stats, self.frozen, self.reference_params,
                batch))[:len(idx)])
        return np.concatenate(values)

    def _by_quarter(self, dataset: dict) -> np.ndarray:
        """The step quarter (0 = the noisiest) of each state of ``dataset``."""
        return np.minimum(dataset["step_index"] * EV_BUCKETS // self.num_steps, EV_BUCKETS - 1)

    def value_diagnostics(self, state: TrainState, dataset: dict) -> dict:
        """Explained variance of V on (fresh) labelled states, overall and per step quarter."""
        predictions = self._per_state(self.value_predict, state, dataset)
        targets = dataset["targets"]
        metrics = {"value_explained_variance": explained_variance(targets, predictions),
                   "value_mse_before_update": float(np.mean((targets - predictions) ** 2))}
        buckets = self._by_quarter(dataset)
        for b in range(EV_BUCKETS):
            sel = buckets == b
            metrics[f"value_ev_q{b + 1}"] = explained_variance(targets[sel], predictions[sel])
        return metrics

    def value_gradient_alignment(self, state: TrainState, dataset: dict,
                                 prompts: list[str]) -> dict:
        """Where V's gradient points, against the reward's (differentiable rewards only).

        For every state x_t of ``dataset`` (``value_dataset`` of the chains of ``prompts``):
        the cosine between d V(x_t) / d x_t, the direction VARD's policy step pushes x_t, and
        d r_std(decode(x0_hat(x_t))) / d x_t, the standardised reward's gradient through the
        frozen reference model's one-step prediction (the reward itself at the final state).
        Returns the mean cosine overall and per quarter of the steps (``_q1``: the noisiest),
        with the fraction of states whose cosine is positive.
        """
        if not self.reward.differentiable:
            raise ValueError(f"the gradient alignment needs a differentiable reward; "
                             f"{self.reward.name!r} is not")
        reward_input = np.asarray(self.reward.prepare(prompts))[dataset["chain"]]
        cosines = self._per_state(self.value_gradient_cosines, state, dataset,
                                  {"reward_input": reward_input})
        metrics = {"value_grad_cosine": float(np.mean(cosines)),
                   "value_grad_cosine_positive": float(np.mean(cosines > 0))}
        buckets = self._by_quarter(dataset)
        for b in range(EV_BUCKETS):
            metrics[f"value_grad_cosine_q{b + 1}"] = float(np.mean(cosines[buckets == b]))
        return metrics

    def value_updates(self, state: TrainState, dataset: dict, rng: np.random.Generator,
                      updates: int | None = None):
        """``updates`` (default ``value.updates_per_epoch``) minibatch steps on the dataset;
        returns (state, metrics): means over the applied updates and counts of the skipped
        ones (``faults.aggregate``)."""
        size = min(self.config.value.batch_size, dataset["states"].shape[0])
        size -= size % self.mesh.shape[mesh_lib.DATA] or 0
        per_update = []
        count = self.config.value.updates_per_epoch if updates is None else updates
        for _ in range(count):
            idx = rng.choice(dataset["states"].shape[0], size=size, replace=False)
            batch = self._value_batch(dataset, idx)
            state, metrics = self.value_step(state, self.frozen, self.reference_params, batch)
            per_update.append(metrics)
        return state, faults.aggregate(per_update)
