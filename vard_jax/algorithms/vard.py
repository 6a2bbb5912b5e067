"""VARD's two losses over the shared rollout.

Value stage: every state x_{i-1} of a trajectory (after step i, at timestep tau_{i-1}) is
labelled with the trajectory's standardised final reward r_hat; L_V = mean (V - r_hat)^2.

Policy stage: a differentiable rollout whose per-step hook computes
    J_i = V(x_{i-1}, tau_{i-1}, c) - beta * D_i,   D_i = mean_dims (eps_theta - eps_ref)^2
with eps the classifier-free-guided predictions at x_i; L_pi = -mean over trained steps of J_i.
The value parameters are constants here; the state entering a step is cut from the graph
according to the gradient depth K (``vard_jax.diffusion.rollout``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import DDIMSchedule


class PolicyLossConfig(NamedTuple):
    beta: float  # KL weight
    grad_depth: int  # K
    eta: float
    guidance_scale: float
    remat: str
    python_loop: bool = False
    unroll: int | bool = 1  # lax.scan unroll of the differentiated rollout (True = full)


class PolicyInputs(NamedTuple):
    """One policy batch."""

    context: jax.Array  # [B, L, D]
    null_context: jax.Array  # [1, L, D]
    x_T: jax.Array  # [B, C, H, W]
    noise: jax.Array  # [B, T, C, H, W]
    step_mask: jax.Array  # [T] float: 1 for trained steps (step subsampling)
    value_aux: dict  # extra inputs of the value model (reward ids, reward statistics)


def value_loss(value_apply: Callable, value_params: Any, states: jax.Array, timesteps: jax.Array,
               context: jax.Array, targets: jax.Array, aux: dict) -> tuple[jax.Array, jax.Array]:
    """(MSE, predictions [N]) of V on labelled states [N, ...] with standardised targets [N]."""
    predictions = value_apply(value_params, states, timesteps, context, aux)
    return jnp.mean((predictions - targets) ** 2), predictions


def policy_loss(
    eps_fn: ddim.EpsFn,
    policy_params: Any,
    reference_params: Any,
    value_apply: Callable,
    value_params: Any,
    schedule: DDIMSchedule,
    inputs: PolicyInputs,
    config: PolicyLossConfig,
    last_step_reward: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[jax.Array, dict]:
    """L_pi and its per-step metrics; differentiate with respect to ``policy_params``.

    ``last_step_reward(x_0) -> [B]`` (standardised) replaces V at the last step when given
    (differentiable rewards only).
    """
    value_params = jax.lax.stop_gradient(value_params)
    reference_params = jax.lax.stop_gradient(reference_params)
    batch = inputs.x_T.shape[0]
    num_steps = schedule.num_steps

    def hook(info: rollout_lib.StepInfo) -> dict:
        distance = rollout_lib.reference_eps_distance(eps_fn, reference_params, info,
                                                      inputs.context, inputs.null_context,
                                                      config.guidance_scale)
        prev_t = jnp.full((batch,), info.prev_timestep, jnp.int32)
        value = value_apply(value_params, info.x_prev, prev_t, inputs.context, inputs.value_aux)
        if last_step_reward is not None:
            is_last = info.index == num_steps - 1
            value = jnp.where(is_last, last_step_reward(info.x_prev), value)
        value = jnp.mean(value)
        return {"value": value, "eps_distance": distance,
                "objective": value - config.beta * distance}

    _, per_step = rollout_lib.rollout(
        eps_fn, policy_params, schedule, inputs.x_T, inputs.noise, inputs.context,
        inputs.null_context, eta=config.eta, guidance_scale=config.guidance_scale,
        grad_depth=config.grad_depth, grad_cut="window", remat=config.remat, step_hook=hook,
        python_loop=config.python_loop, unroll=config.unroll)
    mask = inputs.step_mask
    trained = jnp.maximum(jnp.sum(mask), 1.0)
    loss = -jnp.sum(mask * per_step["objective"]) / trained
    metrics = {
        "policy_loss": loss,
        "policy_value_mean": jnp.sum(mask * per_step["value"]) / trained,
        "eps_distance": jnp.mean(per_step["eps_distance"]),
        "final_value": per_step["value"][-1],
    }
    return loss, metrics


def step_mask(key: jax.Array, num_steps: int, fraction: float) -> jax.Array:
    """[T] float mask of max(1, round(fraction * T)) steps drawn without replacement."""
    count = max(1, int(round(fraction * num_steps)))
    if count >= num_steps:
        return jnp.ones((num_steps,), jnp.float32)
    chosen = jax.random.permutation(key, num_steps)[:count]
    return jnp.zeros((num_steps,), jnp.float32).at[chosen].set(1.0)
