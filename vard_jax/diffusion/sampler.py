"""Text-to-image sampling with a ``Pipeline``: prompt encoding, the rollout scan, decoding."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib, steering as steering_lib
from vard_jax.diffusion.schedule import DDIMSchedule, make_ddim_schedule
from vard_jax.models.pipeline import Pipeline


class Samples(NamedTuple):
    images: jax.Array  # [B, H, W, 3] in [0, 1]
    trajectory: rollout_lib.Trajectory
    context: jax.Array  # [B, L, D] prompt embeddings used


class SamplerSpec(NamedTuple):
    num_steps: int
    eta: float
    guidance_scale: float
    python_loop: bool = False


class SteeringSpec(NamedTuple):
    """How a value steers sampling (``vard_jax.diffusion.steering``); the defaults do not."""

    value_guidance: float = 0.0  # lambda of eps' = eps - lambda sqrt(1 - a_t) grad V
    particles: int = 1  # N particles per prompt; > 1 runs value-steered SMC
    temperature: float = 1.0  # of the SMC potentials exp(V / temperature)
    resample_every: int = 1  # steps between resampling points (0: never)
    ess_threshold: float = 1.0  # resample when ESS < this * N (1.0: at every point)


class SteeredImages(NamedTuple):
    """Images of value-steered or value-guided sampling, prompt-major [P * N, ...]."""

    images: jax.Array  # [P * N, H, W, 3] in [0, 1]
    log_weights: jax.Array  # [P * N] the particles' final log-weights (0 without SMC)
    final_value: jax.Array  # [P * N] V(x_0)
    ess: jax.Array  # [T, P] effective sample size after each step (N without SMC)
    resampled: jax.Array  # [T, P] bool


# The resampling key of steered sampling: fold_in(key, this) of the key that draws its noise.
RESAMPLE_KEY_SALT = 0x5EED

# value_fn(x [B, ...], timesteps [B], context [B, L, D]) -> [B]: V with its parameters bound.
ContextValueFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def make_schedule(pipeline: Pipeline, num_steps: int) -> DDIMSchedule:
    return make_ddim_schedule(pipeline.schedule, num_steps)


def null_ids(pipeline: Pipeline) -> jax.Array:
    """Token ids [1, L] of the empty prompt (the classifier-free guidance condition)."""
    return jnp.asarray(pipeline.tokenize([""]))


def sample(pipeline: Pipeline, params: dict, unet_params: Any, input_ids: jax.Array,
           key: jax.Array, spec: SamplerSpec, eps_fn: Optional[ddim.EpsFn] = None) -> Samples:
    """Samples one image per row of ``input_ids`` [B, L] (traceable; jit the caller).

    ``params`` holds the frozen parts (text encoder, VAE); ``unet_params`` the policy, as
    ``eps_fn`` takes it (default ``pipeline.eps_fn``: plain UNet params).
    """
    schedule = make_schedule(pipeline, spec.num_steps)
    batch = input_ids.shape[0]
    context = pipeline.encode_ids(params["text_encoder"], input_ids)
    null_context = pipeline.encode_ids(params["text_encoder"], null_ids(pipeline))
    x_T, noise = rollout_lib.sample_noise(key, batch, spec.num_steps, pipeline.sample_shape)
    trajectory, _ = rollout_lib.rollout(
        eps_fn or pipeline.eps_fn, unet_params, schedule, x_T, noise, context, null_context,
        eta=spec.eta, guidance_scale=spec.guidance_scale, python_loop=spec.python_loop)
    return Samples(images=pipeline.decode(params, trajectory.x0), trajectory=trajectory,
                   context=context)


def jit_sampler(pipeline: Pipeline, spec: SamplerSpec) -> Callable[..., Samples]:
    """``fn(params, unet_params, input_ids, key) -> Samples``, compiled once per batch shape."""
    def fn(params, unet_params, input_ids, key):
        return sample(pipeline, params, unet_params, input_ids, key, spec)

    return fn if spec.python_loop else jax.jit(fn)


def steered_sample(pipeline: Pipeline, params: dict, unet_params: Any, input_ids: jax.Array,
                   key: jax.Array, spec: SamplerSpec, steering: SteeringSpec,
                   value_fn: ContextValueFn,
                   eps_fn: Optional[ddim.EpsFn] = None) -> SteeredImages:
    """Samples for the rows of ``input_ids`` [P * N, L], N = ``steering.particles``
    consecutive rows per prompt (prompt-major), guided by the value when
    ``steering.value_guidance`` != 0 and resampled by it (SMC) when N > 1 (traceable; jit the
    caller)."""
    schedule = make_schedule(pipeline, spec.num_steps)
    n = steering.particles
    batch = input_ids.shape[0]
    context = pipeline.encode_ids(params["text_encoder"], input_ids)
    null_context = pipeline.encode_ids(params["text_encoder"], null_ids(pipeline))
    # The noise of ``sample`` for the same key (without steering, the same images).
    x_T, noise = rollout_lib.sample_noise(key, batch, spec.num_steps, pipeline.sample_shape)
    key_resample = jax.random.fold_in(key, RESAMPLE_KEY_SALT)

    def value(x, timesteps):
        return value_fn(x, timesteps, context)

    eps_shift = None
    if steering.value_guidance:
        eps_shift = steering_lib.value_guidance(value, schedule, steering.value_guidance)
    eps_fn = eps_fn or pipeline.eps_fn
    if n > 1:
        out = steering_lib.steered_rollout(
            eps_fn, unet_params, schedule, x_T, noise, context, null_context, value,
            key_resample, particles=n, eta=spec.eta, guidance_scale=spec.guidance_scale,
            temperature=steering.temperature, resample_every=steering.resample_every,
            ess_threshold=steering.ess_threshold, eps_shift=eps_shift)
        x0, log_weights, final_value = out.x0, out.log_weights, out.final_value
        ess, resampled = out.ess, out.resampled
    else:
        trajectory, _ = rollout_lib.rollout(
            eps_fn, unet_params, schedule, x_T, noise, context, null_context, eta=spec.eta,
            guidance_scale=spec.guidance_scale, python_loop=spec.python_loop,
            eps_shift=eps_shift)
        x0 = trajectory.x0
        final_value = value(x0, jnp.full((batch,), schedule.prev_timesteps[-1], jnp.int32))
        log_weights = jnp.zeros((batch,), jnp.float32)
        ess = jnp.ones((spec.num_steps, batch), jnp.float32)
        resampled = jnp.zeros((spec.num_steps, batch), bool)
    return SteeredImages(images=pipeline.decode(params, x0), log_weights=log_weights,
                         final_value=final_value, ess=ess, resampled=resampled)
