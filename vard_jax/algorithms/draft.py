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

AlignProp (Prabhudesai et al. 2023) draws K at random per update.
``draft_value_and_grad_random_depth`` takes a traced K, so one compiled function serves every
depth. Where the differentiated rollout is a loop (GPU, TPU) it writes reverse mode out over
the drawn steps, so an update costs T + K forward and K backward model calls; on CPU, where
XLA runs a model's backward pass inside any loop or conditional ~20x slower than straight-line
code, it differentiates the whole unrolled chain with the cut selected by ``where`` (the cost
of K = T, the same gradient). Measured: docs/IMPLEMENTATION.md."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import Schedule

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


def _reference_distance(eps_fn: ddim.EpsFn, reference_params: Any, inputs: DraftInputs,
                        config: DraftConfig, info: rollout_lib.StepInfo) -> jax.Array:
    """D_i ([] float32) at the state of step ``info``, against the (constant) reference."""
    return rollout_lib.reference_eps_distance(
        eps_fn, reference_params, info, inputs.context, inputs.null_context,
        config.guidance_scale, config.kl_on).astype(jnp.float32)


def _kl_hook(eps_fn: ddim.EpsFn, reference_params: Any, inputs: DraftInputs,
             config: DraftConfig, first_trained: jax.Array | int,
             skip: bool = True) -> rollout_lib.StepHook:
    """A step hook returning D_i ([]) at steps i >= first_trained and 0 before: the reference
    is not called there (``skip``: a ``lax.cond``), or called and its result masked
    (``skip=False``: straight-line code, for CPU)."""
    reference_params = jax.lax.stop_gradient(reference_params)

    def hook(info: rollout_lib.StepInfo) -> jax.Array:
        def distance() -> jax.Array:
            return _reference_distance(eps_fn, reference_params, inputs, config, info)

        trained = info.index >= first_trained
        if not skip:
            return jnp.where(trained, distance(), 0.0)
        return jax.lax.cond(trained, distance, lambda: jnp.zeros((), jnp.float32))

    return hook


def _loss_and_metrics(rewards: jax.Array, distance: Optional[jax.Array], depth: jax.Array | int,
                      beta: float) -> tuple[jax.Array, dict]:
    """L = -mean reward (+ beta * ``distance``, the mean D_i over the trained steps, when
    given) and the metrics of every DRaFT form."""
    reward_mean = jnp.mean(rewards)
    loss = -reward_mean
    metrics = {
        "reward_mean": jax.lax.stop_gradient(reward_mean),
        "reward_std": jax.lax.stop_gradient(jnp.std(rewards)),
        "grad_depth": jnp.asarray(depth, jnp.int32),
    }
    if distance is not None:
        loss = loss + beta * distance
        metrics["eps_distance"] = jax.lax.stop_gradient(distance)
    metrics["draft_loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def _objective(eps_fn: ddim.EpsFn, params: Any, reference_params: Any,
               schedule: Schedule, inputs: DraftInputs, reward_fn: RewardFn,
               config: DraftConfig, grad_depth: Optional[int],
               first_trained: jax.Array | int, depth: jax.Array | int,
               cuts: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Shared body: rollout, reward, optional KL over trained steps."""
    hook = None
    if config.beta != 0:
        hook = _kl_hook(eps_fn, reference_params, inputs, config, first_trained,
                        skip=cuts is None)
    trajectory, distances = rollout_lib.rollout(
        eps_fn, params, schedule, inputs.x_T, inputs.noise, inputs.context,
        inputs.null_context, eta=config.eta, guidance_scale=config.guidance_scale,
        grad_depth=grad_depth, grad_cut="last", remat=config.remat, step_hook=hook,
        python_loop=config.python_loop, unroll=config.unroll, cuts=cuts)
    distance = None
    if distances is not None:  # D_i = 0 at untrained steps
        distance = jnp.sum(distances) / jnp.asarray(schedule.num_steps - first_trained,
                                                    jnp.float32)
    return _loss_and_metrics(reward_fn(trajectory.x0), distance, depth, config.beta)


def draft_loss(eps_fn: ddim.EpsFn, params: Any, reference_params: Any, schedule: Schedule,
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
    return _objective(eps_fn, params, reference_params, schedule, inputs, reward_fn,
                      config, grad_depth=depth, first_trained=num_steps - depth, depth=depth)


def draft_value_and_grad_random_depth(
        eps_fn: ddim.EpsFn, params: Any, reference_params: Any, schedule: Schedule,
        inputs: DraftInputs, reward_fn: RewardFn, config: DraftConfig, depth: jax.Array,
        model_params: Callable[[Any], Any] = lambda p: p) -> tuple[jax.Array, dict, Any]:
    """AlignProp's loss and its gradient with respect to ``params``, at a traced depth K.

    The state entering step T - K is cut, as in ``draft_loss``, and the result equals
    ``jax.grad`` of ``draft_loss`` at the static K. With a looped rollout (``config.unroll``
    not True: GPU, TPU) reverse mode is written out over the drawn steps: the chain runs
    forward once without gradient (T model calls, the states kept), the reward's gradient is
    taken at x_0, and a ``while_loop`` walks back from step T - 1 to step T - K, each step
    recomputing its forward pass from the stored state and pulling the cotangent of its
    output (and of its KL term) back to the parameters and to the state that entered it:
    T + K forward and K backward model calls (and the reference's K forward calls when
    beta != 0), the T states and one step's activations in memory. Unrolled (CPU) or in a
    Python loop, the whole chain is differentiated with the cut chosen by ``where``.

    ``model_params(params)`` gives ``eps_fn``'s parameters (e.g. the frozen base UNet with
    trainable LoRA adapters, ``params`` being the adapters): only ``params`` is differentiated.
    Returns ``(loss, metrics, grads)`` with ``grads`` shaped like ``params``. Same metrics as
    ``draft_loss``.
    """
    num_steps = schedule.num_steps
    depth = jnp.clip(jnp.asarray(depth, jnp.int32), 1, num_steps)
    first_trained = num_steps - depth
    if config.unroll is True or config.python_loop:
        steps = jnp.arange(num_steps)
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: _objective(eps_fn, model_params(p), reference_params, schedule,
                                 inputs, reward_fn, config, grad_depth=None,
                                 first_trained=first_trained, depth=depth,
                                 cuts=steps == first_trained), has_aux=True)(params)
        return loss, metrics, grads
    reference_params = jax.lax.stop_gradient(reference_params)
    trajectory, _ = rollout_lib.rollout(
        eps_fn, model_params(jax.lax.stop_gradient(params)), schedule, inputs.x_T, inputs.noise,
        inputs.context, inputs.null_context, eta=config.eta,
        guidance_scale=config.guidance_scale)
    states = jnp.swapaxes(trajectory.x_t, 0, 1)  # [T, B, ...]
    noise = jnp.swapaxes(inputs.noise, 0, 1)
    rewards, reward_vjp = jax.vjp(reward_fn, trajectory.x0)
    batch = rewards.shape[0]
    (x_cotangent,) = reward_vjp(jnp.full(rewards.shape, -1.0 / batch, rewards.dtype))
    kl_weight = config.beta / depth.astype(jnp.float32)

    def step(p: Any, x: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        info = rollout_lib.denoising_step(eps_fn, p, schedule, x, i, noise[i], inputs.context,
                                          inputs.null_context, eta=config.eta,
                                          guidance_scale=config.guidance_scale)
        if config.beta == 0:
            return info.x_prev, jnp.zeros((), jnp.float32)
        return info.x_prev, _reference_distance(eps_fn, reference_params, inputs, config, info)

    def back(i: jax.Array, carry: tuple) -> tuple:
        cotangent, grads, distance_sum = carry
        (x_prev, distance), pullback = jax.vjp(lambda p, x: step(model_params(p), x, i),
                                               params, states[i])
        step_grads, cotangent = pullback((cotangent.astype(x_prev.dtype), kl_weight))
        grads = jax.tree_util.tree_map(jnp.add, grads, step_grads)
        return cotangent, grads, distance_sum + distance

    carry = (x_cotangent, jax.tree_util.tree_map(jnp.zeros_like, params),
             jnp.zeros((), jnp.float32))
    carry = jax.lax.while_loop(
        lambda c: c[0] >= first_trained, lambda c: (c[0] - 1, *back(c[0], c[1:])),
        (jnp.int32(num_steps - 1), *carry))[1:]
    _, grads, distance_sum = carry
    distance = distance_sum / depth.astype(jnp.float32) if config.beta != 0 else None
    return (*_loss_and_metrics(rewards, distance, depth, config.beta), grads)
