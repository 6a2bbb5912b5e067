"""Direct reward backpropagation: DRaFT-K, AlignProp (random K) and DRaFT+ (KL-regularised).

The loss is the negated mean reward of the final samples of a differentiable rollout, with
the gradient truncated to the last K denoising steps (Clark et al. 2023, DRaFT-K; the state
entering step T - K is cut from the graph):
    L = -mean_b r(x_0^b) + beta * mean_{i >= T-K} D_i,   D_i = mean_dims (eps_theta - eps_ref)^2
D_i is VARD's per-step distance between the noise predictions of the policy and of the frozen
reference at the policy's own state x_i (conditional or guided, ``kl_on``). It is taken over
the K steps that carry gradient (the steps being fine-tuned); steps before the cut skip the
reference call. beta = 0 (plain DRaFT / AlignProp) drops the reference model from the traced
graph.

AlignProp (Prabhudesai et al. 2023) draws K at random per update. ``draft_loss_random_depth``
takes a traced K, so one compiled function serves every depth: the cut is a traced array, and
the steps before it run forward only (one ``lax.switch`` per step), so the backward pass costs
K steps, not T."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import DDIMSchedule

# reward_fn(x_0 [B, C, H, W]) -> [B]: differentiable (decoding and prompts closed over).
RewardFn = Callable[[jax.Array], jax.Array]


class DraftConfig(NamedTuple):
    """Static settings of the DRaFT loss (Python scalars)."""

    grad_depth: Optional[int]  # K: backpropagate through the last K steps (None = all)
    beta: float  # weight of the noise-prediction distance to the reference (0 = off)
    eta: float
    guidance_scale: float
    remat: str = "none"  # rematerialisation of the step body: none | full | dots
    python_loop: bool = False
    unroll: int | bool = 1  # lax.scan unroll of the differentiated rollout (True = full)
    kl_on: str = "guided"  # D_i on the guided or the conditional predictions


class DraftInputs(NamedTuple):
    """One batch of reparameterised rollouts."""

    context: jax.Array  # [B, L, D]
    null_context: jax.Array  # [1, L, D]
    x_T: jax.Array  # [B, C, H, W]
    noise: jax.Array  # [B, T, C, H, W]


def check_reward(reward: Any) -> None:
    """Raises ValueError unless ``reward`` (a ``rewards.registry.Reward``) is differentiable."""
    if not getattr(reward, "differentiable", False):
        name = getattr(reward, "name", repr(reward))
        raise ValueError(f"draft needs a differentiable reward; {name!r} is not "
                         "(use algorithm=vard or ddpo)")


def sample_depth(key: jax.Array, num_steps: int, low: int = 1,
                 high: Optional[int] = None) -> jax.Array:
    """AlignProp's random truncation depth: K ~ uniform on {low, ..., high} (high = T default).

    Returns a [] int32 array (traceable; ``int(...)`` it outside jit for a Python int).
    """
    high = num_steps if high is None else high
    if not 1 <= low <= high <= num_steps:
        raise ValueError(f"depth range [{low}, {high}] must lie within [1, {num_steps}]")
    return jax.random.randint(key, (), low, high + 1, dtype=jnp.int32)


def _kl_hook(eps_fn: ddim.EpsFn, reference_params: Any, inputs: DraftInputs,
             guidance_scale: float, kl_on: str,
             first_trained: jax.Array | int) -> rollout_lib.StepHook:
    """A step hook returning D_i ([]) at steps i >= first_trained and 0 before (no model call)."""
    reference_params = jax.lax.stop_gradient(reference_params)

    def hook(info: rollout_lib.StepInfo) -> jax.Array:
        def distance() -> jax.Array:
            return rollout_lib.reference_eps_distance(
                eps_fn, reference_params, info, inputs.context, inputs.null_context,
                guidance_scale, kl_on).astype(jnp.float32)

        return jax.lax.cond(info.index >= first_trained, distance,
                            lambda: jnp.zeros((), jnp.float32))

    return hook


def _objective(eps_fn: ddim.EpsFn, policy_eps_fn: ddim.EpsFn, params: Any, reference_params: Any,
               schedule: DDIMSchedule, inputs: DraftInputs, reward_fn: RewardFn,
               config: DraftConfig, grad_depth: Optional[int],
               first_trained: jax.Array | int, depth: jax.Array | int,
               cuts: Optional[jax.Array] = None,
               train_mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Shared body: rollout with ``policy_eps_fn``, reward, optional KL over trained steps."""
    num_steps = schedule.num_steps
    hook = None
    if config.beta != 0:
        hook = _kl_hook(eps_fn, reference_params, inputs, config.guidance_scale, config.kl_on,
                        first_trained)
    trajectory, distances = rollout_lib.rollout(
        policy_eps_fn, params, schedule, inputs.x_T, inputs.noise, inputs.context,
        inputs.null_context, eta=config.eta, guidance_scale=config.guidance_scale,
        grad_depth=grad_depth, grad_cut="last", remat=config.remat, step_hook=hook,
        python_loop=config.python_loop, unroll=config.unroll, cuts=cuts, train_mask=train_mask)
    rewards = reward_fn(trajectory.x0)
    reward_mean = jnp.mean(rewards)
    loss = -reward_mean
    metrics = {
        "reward_mean": jax.lax.stop_gradient(reward_mean),
        "reward_std": jax.lax.stop_gradient(jnp.std(rewards)),
        "grad_depth": jnp.asarray(depth, jnp.int32),
    }
    if distances is not None:
        trained = jnp.asarray(num_steps - first_trained, jnp.float32)
        distance = jnp.sum(distances) / trained  # D_i = 0 at untrained steps
        loss = loss + config.beta * distance
        metrics["eps_distance"] = jax.lax.stop_gradient(distance)
    metrics["draft_loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def draft_loss(eps_fn: ddim.EpsFn, params: Any, reference_params: Any, schedule: DDIMSchedule,
               inputs: DraftInputs, reward_fn: RewardFn,
               config: DraftConfig) -> tuple[jax.Array, dict]:
    """DRaFT-K (static K = ``config.grad_depth``), optionally KL-regularised (DRaFT+).

    Args:
      eps_fn: the noise model ``eps_fn(params, x, timesteps, context)``.
      params: the policy parameters (differentiate with respect to these).
      reference_params: the frozen reference (unused and untraced when ``config.beta == 0``).
      inputs: x_T [B, C, H, W], noise [B, T, C, H, W], context [B, L, D], null_context.
      reward_fn: ``reward_fn(x_0 [B, C, H, W]) -> [B]``, differentiable.

    Returns:
      (loss [], metrics): reward_mean, reward_std, grad_depth, eps_distance (beta != 0).
    """
    num_steps = schedule.num_steps
    depth = num_steps if config.grad_depth is None else min(config.grad_depth, num_steps)
    if depth < 1:
        raise ValueError(f"grad_depth = {config.grad_depth} must be >= 1")
    return _objective(eps_fn, eps_fn, params, reference_params, schedule, inputs, reward_fn,
                      config, grad_depth=depth, first_trained=num_steps - depth, depth=depth)


def draft_loss_random_depth(eps_fn: ddim.EpsFn, params: Any, reference_params: Any,
                            schedule: DDIMSchedule, inputs: DraftInputs, reward_fn: RewardFn,
                            config: DraftConfig, depth: jax.Array) -> tuple[jax.Array, dict]:
    """AlignProp: DRaFT-K with a traced depth K ([] int, clipped to [1, T]).

    ``config.grad_depth`` is ignored. The state entering step T - K is cut, and the steps
    before it run forward only (``rollout``'s ``train_mask``: one ``lax.switch`` per step), so
    an update's backward pass covers the K drawn steps, not T. Same arguments and metrics as
    ``draft_loss``.
    """
    num_steps = schedule.num_steps
    depth = jnp.clip(jnp.asarray(depth, jnp.int32), 1, num_steps)
    first_trained = num_steps - depth
    steps = jnp.arange(num_steps)
    return _objective(eps_fn, eps_fn, params, reference_params, schedule, inputs,
                      reward_fn, config, grad_depth=None, first_trained=first_trained,
                      depth=depth, cuts=steps == first_trained, train_mask=steps >= first_trained)
