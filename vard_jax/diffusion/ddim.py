"""One DDIM step as a pure function, and classifier-free guidance.

At step i with a_i = alpha_bar(tau_i), a_prev = alpha_bar(tau_{i-1}):
    x0_hat = (x_i - sqrt(1 - a_i) eps) / sqrt(a_i)
    sigma  = eta sqrt((1 - a_prev) / (1 - a_i)) sqrt(1 - a_i / a_prev)
    mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps
    x_prev = mean + sigma z
The mean is the noise-free step of diffusers' DDIM schedulers and sigma is eta times the
square root of their variance; the tests compare both against diffusers.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # the schedule's methods call this module's functions
    from vard_jax.diffusion.schedule import DDIMSchedule

# eps_fn(params, x [B, ...], timesteps [B], context [B, L, D]) -> the model's output [B, ...]
# (timesteps int32 for DDPM models, float32 for flow models).
EpsFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


class StepOutput(NamedTuple):
    x_prev: jax.Array  # [B, ...] the sample after the step
    mean: jax.Array  # [B, ...] mu_i, the noise-free step
    std: jax.Array  # [] sigma_i
    x0_hat: jax.Array  # [B, ...] the one-step prediction of x_0
    eps: jax.Array  # [B, ...] the noise prediction the step used


def _broadcast(value: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(value, jnp.shape(value) + (1,) * (like.ndim - jnp.ndim(value)))


CLIP_GRADIENTS = ("exact", "straight_through")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def clip_straight_through(x: jax.Array, limit: float) -> jax.Array:
    """clip(x, -limit, limit) whose derivative is the identity (a straight-through estimator)."""
    return jnp.clip(x, -limit, limit)


@clip_straight_through.defjvp
def _clip_straight_through_jvp(limit, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return clip_straight_through(x, limit), x_dot


def predict_x0_eps(schedule: DDIMSchedule, a_t: jax.Array, x_t: jax.Array,
                   model_output: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps) from the model's output, for any prediction type; a_t: [] or [B]."""
    x0, eps = _unclipped_x0_eps(schedule, a_t, x_t, model_output)
    return clip_x0(schedule, x0), eps


def _unclipped_x0_eps(schedule: DDIMSchedule, a_t: jax.Array, x_t: jax.Array,
                      model_output: jax.Array) -> tuple[jax.Array, jax.Array]:
    a = _broadcast(a_t, x_t)
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    elif schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * model_output
        eps = jnp.sqrt(a) * model_output + jnp.sqrt(1.0 - a) * x_t
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    else:
        raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported")
    return x0, eps


def eps_per_output(schedule: DDIMSchedule, a_t: jax.Array) -> jax.Array:
    """d eps / d model output at a fixed x_t: 1 (epsilon), sqrt(a) (v_prediction),
    -sqrt(a / (1 - a)) (sample). Differences of noise predictions of two models at the same
    state are this times the difference of their outputs."""
    if schedule.prediction_type == "epsilon":
        return jnp.ones_like(a_t)
    if schedule.prediction_type == "v_prediction":
        return jnp.sqrt(a_t)
    if schedule.prediction_type == "sample":
        return -jnp.sqrt(a_t / (1.0 - a_t))
    raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported")


def clip_x0(schedule: DDIMSchedule, x0: jax.Array) -> jax.Array:
    """The sampler's clip of a one-step prediction (``clip_sample``; identity when off), with
    the derivative ``schedule.clip_gradient``."""
    if not schedule.clip_sample:
        return x0
    if schedule.clip_gradient == "straight_through":
        return clip_straight_through(x0, schedule.clip_sample_range)
    if schedule.clip_gradient == "exact":
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    raise ValueError(f"clip_gradient {schedule.clip_gradient!r} is not supported; use one of "
                     f"{', '.join(CLIP_GRADIENTS)}")


def ddim_std(schedule: DDIMSchedule, i: jax.Array | int, eta: float) -> jax.Array:
    """sigma_i of step i."""
    a_t, a_prev = schedule.alpha_t[i], schedule.alpha_prev[i]
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    return eta * jnp.sqrt(variance)


def ddim_step(schedule: DDIMSchedule, i: jax.Array | int, x_t: jax.Array,
              model_output: jax.Array, noise: jax.Array | None, eta: float,
              eps_shift: jax.Array | None = None) -> StepOutput:
    """Step i of the DDIM grid (i = 0 is the noisiest). ``noise`` is z_i, or None for the mean.

    ``eps_shift`` ([B, ...], optional) is added to the noise prediction (in the eps
    parametrisation, whatever the model predicts) and x0_hat follows from the shifted eps:
    classifier (value) guidance, ``vard_jax.diffusion.steering``.
    """
    a_t, a_prev = schedule.alpha_t[i], schedule.alpha_prev[i]
    if eps_shift is None:
        x0_hat, eps = predict_x0_eps(schedule, a_t, x_t, model_output)
    else:  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) moves by -sqrt((1 - a) / a) * shift; a zero
        # shift leaves both exactly as they were.
        x0_raw, eps = _unclipped_x0_eps(schedule, a_t, x_t, model_output)
        eps = eps + eps_shift
        x0_hat = clip_x0(schedule, x0_raw - jnp.sqrt((1.0 - a_t) / a_t) * eps_shift)
    std = ddim_std(schedule, i, eta)
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
    mean = jnp.sqrt(a_prev) * x0_hat + direction
    x_prev = mean if noise is None else mean + std * noise
    return StepOutput(x_prev=x_prev, mean=mean, std=std, x0_hat=x0_hat, eps=eps)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log N(x; mean, std^2 I), summed over all but the batch axis: [B].

    A deterministic step (std = 0, eta = 0) has no density; it returns 0 there.
    """
    safe_std = jnp.where(std > 0, std, 1.0)
    per_dim = (-((x - mean) ** 2) / (2.0 * safe_std**2) - jnp.log(safe_std)
               - 0.5 * math.log(2.0 * math.pi))
    log_prob = jnp.sum(per_dim.reshape(x.shape[0], -1), axis=-1)
    return jnp.where(std > 0, log_prob, jnp.zeros_like(log_prob))


def guided_eps(eps_fn: EpsFn, params: object, x: jax.Array, timesteps: jax.Array,
               context: jax.Array, null_context: jax.Array, guidance_scale: float) -> jax.Array:
    """Classifier-free guidance as one batched model call.

    eps~ = eps(x, t, null) + w (eps(x, t, c) - eps(x, t, null)); with w = 1 the null call is
    skipped. ``null_context`` is [1, L, D] or [B, L, D] (the empty prompt's embedding).
    """
    return guided_and_conditional_eps(eps_fn, params, x, timesteps, context, null_context,
                                      guidance_scale)[0]


def guided_and_conditional_eps(eps_fn: EpsFn, params: object, x: jax.Array,
                               timesteps: jax.Array, context: jax.Array, null_context: jax.Array,
                               guidance_scale: float) -> tuple[jax.Array, jax.Array]:
    """(eps~ guided, eps(x, t, c) conditional) from the one batched call of ``guided_eps``."""
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
        eps = eps_fn(params, x, timesteps, context)
        return eps, eps
    batch = x.shape[0]
    null_context = jnp.broadcast_to(null_context, (batch,) + null_context.shape[1:])
    both = eps_fn(params, jnp.concatenate([x, x]), jnp.concatenate([timesteps, timesteps]),
                  jnp.concatenate([null_context, context]))
    eps_null, eps_cond = both[:batch], both[batch:]
    return eps_null + guidance_scale * (eps_cond - eps_null), eps_cond
