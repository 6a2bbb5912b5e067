"""VARD's two losses over the shared rollout.

Value stage: every state x_{i-1} of a trajectory (after step i, at timestep tau_{i-1}) is
labelled with the trajectory's standardised final reward r_hat; L_V = mean (V - r_hat)^2.

Policy stage: a differentiable rollout whose per-step hook computes
    J_i = V(x_{i-1}, tau_{i-1}, c) - beta * D_i,   D_i = mean_dims (eps_theta - eps_ref)^2
with eps the classifier-free-guided predictions at x_i (``kl_on="guided"``, the default) or
the conditional ones (``"conditional"``); L_pi = -mean over trained steps of J_i. The value
parameters are constants here; the state entering a step is cut from the graph according to
the gradient depth K (``vard_jax.diffusion.rollout``): block truncation, the steps are split
into windows of K and a step's objective is differentiated through the earlier steps of its
own window only (between 1 and K steps). With step subsampling the untrained steps run
forward only and the steps after the last trained one do not run (at K = 1, without a
final reward; otherwise the mask only selects the objective's terms). With
``last_step_reward`` the last step's value is replaced by the reward of x_0, computed once
after the rollout.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import Schedule


class PolicyLossConfig(NamedTuple):
    beta: float  # KL weight
    grad_depth: int  # K
    eta: float
    guidance_scale: float
    remat: str
    python_loop: bool = False
    unroll: int | bool = 1  # lax.scan unroll of the differentiated rollout (True = full)
    kl_on: str = "guided"  # D_i on the guided or the conditional predictions
    # Step subsampling: the number of steps step_mask trains (0 = every step). With K = 1 and
    # no final reward, only those steps are differentiated (``policy_loss``).
    trained_steps: int = 0


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
    schedule: Schedule,
    inputs: PolicyInputs,
    config: PolicyLossConfig,
    last_step_reward: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[jax.Array, dict]:
    """L_pi and its per-step metrics; differentiate with respect to ``policy_params``.

    ``last_step_reward(x_0) -> [B]`` (standardised) replaces V at the last step when given
    (differentiable rewards only); it is evaluated once, on the rollout's final state.
    """
    value_params = jax.lax.stop_gradient(value_params)
    reference_params = jax.lax.stop_gradient(reference_params)
    batch = inputs.x_T.shape[0]
    num_steps = schedule.num_steps

    def hook(info: rollout_lib.StepInfo) -> dict:
        distance = rollout_lib.reference_eps_distance(eps_fn, reference_params, info,
                                                      inputs.context, inputs.null_context,
                                                      config.guidance_scale, config.kl_on)
        prev_t = rollout_lib.step_timesteps(info.prev_timestep, batch)
        value = value_apply(value_params, info.x_prev, prev_t, inputs.context, inputs.value_aux)
        return {"value": jnp.mean(value), "eps_distance": distance}

    mask = inputs.step_mask
    if 0 < config.trained_steps < num_steps and config.grad_depth == 1 and (
            last_step_reward is None):
        return _trained_steps_loss(eps_fn, policy_params, schedule, inputs, config, hook)
    trajectory, per_step = rollout_lib.rollout(
        eps_fn, policy_params, schedule, inputs.x_T, inputs.noise, inputs.context,
        inputs.null_context, eta=config.eta, guidance_scale=config.guidance_scale,
        grad_depth=config.grad_depth, grad_cut="window", remat=config.remat, step_hook=hook,
        python_loop=config.python_loop, unroll=config.unroll)
    value = per_step["value"]
    if last_step_reward is not None:
        # x_0 is the state after the last step: its gradient reaches the parameters through
        # the last window, as V(x_0) would.
        value = value.at[num_steps - 1].set(jnp.mean(last_step_reward(trajectory.x0)))
    objective = value - config.beta * per_step["eps_distance"]
    trained = jnp.maximum(jnp.sum(mask), 1.0)
    loss = -jnp.sum(mask * objective) / trained
    last_trained = num_steps - 1 - jnp.argmax(mask[::-1] > 0)
    metrics = {
        "policy_loss": loss,
        "policy_value_mean": jnp.sum(mask * value) / trained,
        "eps_distance": jnp.sum(mask * per_step["eps_distance"]) / trained,
        "final_value": value[last_trained],  # at the last trained step
    }
    return loss, metrics


def _trained_steps_loss(eps_fn: ddim.EpsFn, policy_params: Any, schedule: Schedule,
                        inputs: PolicyInputs, config: PolicyLossConfig,
                        hook: Callable[[rollout_lib.StepInfo], dict]) -> tuple[jax.Array, dict]:
    """``policy_loss`` with step subsampling at K = 1: the same loss and gradient, computed
    from the trained steps only.

    With K = 1 a trained step's objective depends on the parameters through its own UNet call
    only (the state entering it is cut from the graph). So the chain runs forward once, without
    gradient, up to the last trained step (the steps after it are never computed), and then
    each of the ``config.trained_steps`` trained steps runs again from its stored state, with
    gradient and the hook: T_last forward calls plus, per trained step, one differentiated call
    and the hook's (reference, value).
    """
    count = config.trained_steps
    trained = jnp.nonzero(inputs.step_mask > 0, size=count)[0]  # ascending
    last = trained[count - 1]
    states = rollout_lib.states_until(
        eps_fn, jax.lax.stop_gradient(policy_params), schedule, inputs.x_T, inputs.noise,
        inputs.context, inputs.null_context, last, eta=config.eta,
        guidance_scale=config.guidance_scale)
    noise = jnp.swapaxes(inputs.noise, 0, 1)  # [T, B, ...]

    def one(params, index):
        info = rollout_lib.denoising_step(
            eps_fn, params, schedule, states[index], index, noise[index], inputs.context,
            inputs.null_context, eta=config.eta, guidance_scale=config.guidance_scale)
        return hook(info)

    if config.remat != "none":
        one = jax.checkpoint(one, policy=rollout_lib.REMAT_POLICIES[config.remat])
    if config.unroll is True:  # CPU: a differentiated loop runs far slower (resolve_unroll)
        per_step = jax.tree_util.tree_map(
            lambda *values: jnp.stack(values),
            *[one(policy_params, trained[j]) for j in range(count)])
    else:  # one trained step's activations in memory at a time
        per_step = jax.lax.map(lambda index: one(policy_params, index), trained)
    objective = per_step["value"] - config.beta * per_step["eps_distance"]
    loss = -jnp.mean(objective)
    return loss, {"policy_loss": loss, "policy_value_mean": jnp.mean(per_step["value"]),
                  "eps_distance": jnp.mean(per_step["eps_distance"]),
                  "final_value": per_step["value"][count - 1]}


def trained_steps(num_steps: int, fraction: float) -> int:
    """How many steps of a rollout ``step_mask`` trains: max(1, round(fraction * T))."""
    return min(num_steps, max(1, int(round(fraction * num_steps))))


def step_mask(key: jax.Array, num_steps: int, fraction: float) -> jax.Array:
    """[T] float mask of ``trained_steps(T, fraction)`` steps drawn without replacement."""
    count = trained_steps(num_steps, fraction)
    if count >= num_steps:
        return jnp.ones((num_steps,), jnp.float32)
    chosen = jax.random.permutation(key, num_steps)[:count]
    return jnp.zeros((num_steps,), jnp.float32).at[chosen].set(1.0)
