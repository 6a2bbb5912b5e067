"""Text-to-image sampling with a ``Pipeline``: prompt encoding, the rollout scan, decoding."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.diffusion import ddim, rollout as rollout_lib
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
