"""The jitted pure steps of a run, with explicit in/out shardings, over ``Components``:

* ``sample(policy_params, frozen, reference, ids, key) -> Rollout``: images and the states
  of the chains;
* ``value_step(state, frozen, reference, batch) -> (state, metrics)`` and
  ``policy_step(state, frozen, reference, batch, key) -> (state, metrics)``: the state
  donated (frozen weights are inputs, not constants). An update whose loss or gradient is
  not finite leaves the state as it was, except for the skip counters
  (``faults.keep_finite``);
* ``value_predict`` and ``value_gradient_cosines``: V and the direction of its gradient on
  labelled states (``vard_jax.training.value_data``).

``value_update``, ``policy_inputs`` and ``policy_update`` are their bodies as plain functions
(experiments/sd_memory.py measures them alone).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vard_jax.algorithms import vard
from vard_jax.diffusion import rollout as rollout_lib, sampler as sampler_lib
from vard_jax.models import policy as policy_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training import faults
from vard_jax.training.components import Components
from vard_jax.training.optimizers import apply_policy_gradient
from vard_jax.training.state import TrainState


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


class Steps(NamedTuple):
    """The compiled functions of a run (module docstring) and their shardings."""

    sample: Callable[..., Rollout]
    value_predict: Callable[..., jax.Array]
    value_gradient_cosines: Callable[..., jax.Array]
    value_step: Callable[..., tuple[TrainState, dict]]
    policy_step: Callable[..., tuple[TrainState, dict]]
    shardings: StepShardings
    abstract_state: TrainState  # shapes and dtypes of the state (no placement)


def value_update(value_apply: Any, optimizer: optax.GradientTransformation, state: TrainState,
                 batch: dict, aux: Any) -> tuple[TrainState, dict]:
    """One value regression step (MSE to the batch's targets) with non-finite skipping.

    ``batch``: states [N, ...], timesteps [N], context [N, L, D], targets [N]; ``aux`` the
    value model's extra inputs. The body of ``Steps.value_step``, shared with
    experiments/sd_memory.py.
    """
    def loss_fn(params):
        return vard.value_loss(value_apply, params, batch["states"], batch["timesteps"],
                               batch["context"], batch["targets"], aux)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.value_params)
    updates, opt_state = optimizer.update(grads, state.value_opt_state, state.value_params)
    new_state = state.replace(value_params=optax.apply_updates(state.value_params, updates),
                              value_opt_state=opt_state, value_updates=state.value_updates + 1)
    grad_norm = optax.tree.norm(grads)
    state, skipped = faults.keep_finite(state, new_state, "value", loss, grad_norm)
    return state, {"value_loss": loss, "value_grad_norm": grad_norm, **skipped}


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
    ``Steps.policy_step``, shared with experiments/sd_memory.py."""
    def loss_fn(params):
        return vard.policy_loss(policy.eps_fn, policy.unet(params, reference_params),
                                policy.reference_unet(reference_params), value_apply,
                                state.value_params, schedule, inputs, loss_config,
                                last_step_reward)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.policy_params)
    return apply_policy_gradient(optimizer, state, grads, loss, metrics)


def build(c: Components) -> Steps:
    """Jits the steps of ``c``'s run once, with the shardings of its mesh."""
    pipeline, policy_schedule, config = c.pipeline, c.policy_schedule, c.config
    shape = pipeline.sample_shape
    value_apply = c.value_model.apply
    reward = c.reward
    abstract_state = jax.eval_shape(c.init_state_abstract)
    state_sharding = c.state_shardings(abstract_state)

    sampler_spec = c.sampler_spec
    policy = c.policy

    def sample(policy_params, frozen, reference_params, ids, key):
        samples = sampler_lib.sample(pipeline, frozen,
                                     policy.unet(policy_params, reference_params), ids, key,
                                     sampler_spec, eps_fn=policy.eps_fn)
        return Rollout(images=samples.images, states=samples.trajectory.x_prev,
                       context=samples.context, x0=samples.trajectory.x0)

    def value_predict(value_params, stats, frozen, reference_params, batch):
        aux = c.value_aux(stats, frozen, reference_params, batch.get("reward_ids"))
        return value_apply(value_params, batch["states"], batch["timesteps"],
                           batch["context"], aux)

    def value_gradient_cosines(value_params, stats, frozen, reference_params, batch):
        # Per state: cos(dV/dx_t, d r_std(decode(x0_hat(x_t)))/dx_t); see
        # value_gradient_alignment (differentiable rewards only).
        aux = c.value_aux(stats, frozen, reference_params, batch.get("reward_ids"))
        t, context = batch["timesteps"], batch["context"]

        def value(x):
            return jnp.sum(value_apply(value_params, x, t, context, aux))

        def standardised_reward(x):
            images = pipeline.decode(frozen, c.reference_x0_hat(reference_params, x, t, context))
            return jnp.sum(stats.standardise(reward.score(images, batch["reward_input"])))

        g_v = jax.grad(value)(batch["states"]).reshape(t.shape[0], -1)
        g_r = jax.grad(standardised_reward)(batch["states"]).reshape(t.shape[0], -1)
        norms = jnp.linalg.norm(g_v, axis=1) * jnp.linalg.norm(g_r, axis=1)
        return jnp.sum(g_v * g_r, axis=1) / jnp.maximum(norms, 1e-30)

    def value_step(state: TrainState, frozen: dict, reference_params, batch: dict):
        aux = c.value_aux(state.reward_stats, frozen, reference_params, batch.get("reward_ids"))
        return value_update(value_apply, c.value_optimizer, state, batch, aux)

    def policy_step(state: TrainState, frozen: dict, reference_params, batch: dict, key):
        context, null_context = sampler_lib.encode(pipeline, frozen["text_encoder"], batch["ids"])
        inputs = policy_inputs(
            key, context, null_context, c.num_steps, shape, config.policy.train_fraction,
            c.value_aux(state.reward_stats, frozen, reference_params, batch.get("reward_input")))
        def last_step_reward(x0):
            images = pipeline.decode(frozen, x0)
            return state.reward_stats.standardise(reward.score(images, batch["reward_input"]))

        return policy_update(policy, value_apply, c.policy_optimizer, policy_schedule,
                             c.loss_config, state, reference_params, inputs,
                             last_step_reward if config.reward.direct_last_step else None)

    replicated, batch = c.replicated, c.batch_sharding
    frozen_sharding = mesh_lib.param_shardings(c.mesh, c.frozen)
    reference_sharding = mesh_lib.param_shardings(c.mesh, c.reference_params)
    policy_sharding = state_sharding.policy_params
    shardings = StepShardings(state_sharding, frozen_sharding, reference_sharding, batch,
                              replicated)
    sample_jit = jax.jit(sample, in_shardings=(policy_sharding, frozen_sharding,
                                               reference_sharding, batch, replicated),
                         out_shardings=Rollout(batch, batch, batch, batch))
    value_predict_jit = jax.jit(value_predict, in_shardings=(
        state_sharding.value_params, state_sharding.reward_stats, frozen_sharding,
        reference_sharding, batch), out_shardings=batch)
    value_gradient_cosines_jit = jax.jit(value_gradient_cosines, out_shardings=batch)
    value_step_jit = jax.jit(value_step, in_shardings=(
        state_sharding, frozen_sharding, reference_sharding, batch),
        out_shardings=(state_sharding, replicated), donate_argnums=0)
    policy_batch_sharding = {"ids": batch}
    if config.reward.direct_last_step or c.value_needs_reward_ids:
        policy_batch_sharding["reward_input"] = batch
    policy_step_jit = jax.jit(policy_step, in_shardings=(
        state_sharding, frozen_sharding, reference_sharding, policy_batch_sharding, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=0)
    return Steps(sample_jit, value_predict_jit, value_gradient_cosines_jit, value_step_jit,
                 policy_step_jit, shardings, abstract_state)
