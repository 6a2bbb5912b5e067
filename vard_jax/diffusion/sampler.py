"""Text-to-image sampling with a ``TextToImage`` model: prompt encoding, the rollout scan,
decoding."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import ddim, rollout as rollout_lib, schedule as schedule_lib
from vard_jax.diffusion import steering as steering_lib
from vard_jax.diffusion.schedule import Schedule, ScheduleConfig


class TextToImage(Protocol):
    """What sampling needs of a model family; ``vard_jax.models.pipeline.Pipeline`` is one.

    The sampling layer states its needs here, so that it depends on no model code."""

    schedule: ScheduleConfig  # the denoiser's training schedule (DDPM noise, or flow matching)
    sample_shape: tuple[int, ...]  # [C, H, W] of the denoiser's input (pixels or latents)
    image_seq_len: Optional[int]  # latent tokens, for a flow grid's dynamic shifting

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray: ...

    def encode_ids(self, text_params: Any, input_ids: jax.Array) -> jax.Array: ...

    def eps_fn(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
               context: jax.Array) -> jax.Array: ...

    def decode(self, params: dict, x0: jax.Array) -> jax.Array: ...


class Samples(NamedTuple):
    images: jax.Array  # [B, H, W, 3] in [0, 1]
    trajectory: rollout_lib.Trajectory
    context: jax.Array  # [B, L, D] prompt embeddings used
    hook_outputs: Any = None  # the step hook's outputs stacked to [T, ...] (None without)


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


def make_schedule(pipeline: TextToImage, num_steps: int) -> Schedule:
    """The sampling grid of the pipeline's model (DDIM, or the flow grid of a flow model)."""
    return schedule_lib.make_schedule(pipeline.schedule, num_steps, pipeline.image_seq_len)


def null_ids(pipeline: TextToImage) -> jax.Array:
    """Token ids [1, L] of the empty prompt (the classifier-free guidance condition)."""
    return jnp.asarray(pipeline.tokenize([""]))


def encode(pipeline: TextToImage, text_params: Any,
           input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(context [B, L, D] of ``input_ids``, null context [1, L, D] of the empty prompt): the
    two conditions of classifier-free guidance."""
    return (pipeline.encode_ids(text_params, input_ids),
            pipeline.encode_ids(text_params, null_ids(pipeline)))


# hook(step info, context, null context) -> pytree, stacked over the steps.
SampleHook = Callable[[rollout_lib.StepInfo, jax.Array, jax.Array], Any]


def sample(pipeline: TextToImage, params: dict, unet_params: Any, input_ids: jax.Array,
           key: jax.Array, spec: SamplerSpec, eps_fn: Optional[ddim.EpsFn] = None,
           step_hook: Optional[SampleHook] = None) -> Samples:
    """Samples one image per row of ``input_ids`` [B, L] (traceable; jit the caller).

    ``params`` holds the frozen parts (text encoder, VAE); ``unet_params`` the policy, as
    ``eps_fn`` takes it (default ``pipeline.eps_fn``: plain UNet params). ``step_hook``
    sees every step (with the prompts' contexts); its outputs are ``Samples.hook_outputs``.
    """
    schedule = make_schedule(pipeline, spec.num_steps)
    batch = input_ids.shape[0]
    context, null_context = encode(pipeline, params["text_encoder"], input_ids)
    x_T, noise = rollout_lib.sample_noise(key, batch, spec.num_steps, pipeline.sample_shape)

    def hook(info):
        return step_hook(info, context, null_context)

    trajectory, hook_outputs = rollout_lib.rollout(
        eps_fn or pipeline.eps_fn, unet_params, schedule, x_T, noise, context, null_context,
        eta=spec.eta, guidance_scale=spec.guidance_scale, python_loop=spec.python_loop,
        step_hook=None if step_hook is None else hook)
    return Samples(images=pipeline.decode(params, trajectory.x0), trajectory=trajectory,
                   context=context, hook_outputs=hook_outputs)


def jit_sampler(pipeline: TextToImage, spec: SamplerSpec) -> Callable[..., Samples]:
    """``fn(params, unet_params, input_ids, key) -> Samples``, compiled once per batch shape."""
    def fn(params, unet_params, input_ids, key):
        return sample(pipeline, params, unet_params, input_ids, key, spec)

    return fn if spec.python_loop else jax.jit(fn)


def steered_sample(pipeline: TextToImage, params: dict, unet_params: Any, input_ids: jax.Array,
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
    context, null_context = encode(pipeline, params["text_encoder"], input_ids)
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
        final_value = value(x0, rollout_lib.step_timesteps(schedule.prev_timesteps[-1], batch))
        log_weights = jnp.zeros((batch,), jnp.float32)
        ess = jnp.ones((spec.num_steps, batch), jnp.float32)
        resampled = jnp.zeros((spec.num_steps, batch), bool)
    return SteeredImages(images=pipeline.decode(params, x0), log_weights=log_weights,
                         final_value=final_value, ess=ess, resampled=resampled)
