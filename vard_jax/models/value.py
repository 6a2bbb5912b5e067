"""Value networks V(x_t, t, c): predictions of the (standardised) final reward.

* ``ConvValue`` (default, ``value.arch = "conv"``): a small convolutional encoder of the noisy
  state, FiLM-modulated by a sinusoidal timestep embedding and the mean-pooled prompt
  embedding, with a scalar head.
* ``conv_x0_value`` (``value.arch = "conv_x0"``): the same network on the frozen reference
  model's one-step prediction x0_hat(x_t) instead of the noisy state.
* ``unet_head_value`` (``value.arch = "unet_head"``): a small head on the mid-block features of
  the frozen reference UNet at (x_t, t, c) (VARD's value-head option): the UNet's own reading
  of the state, at the cost of one reference UNet call per value.
* ``RewardInitValue`` (``value.arch = "reward_init"``): the reward network's own backbone (a
  CLIP) applied to the decoded one-step prediction x0_hat(x_t) of the frozen reference model,
  started from the reward's weights, plus a per-timestep affine correction initialised to the
  identity; so V equals the standardised reward of x0_hat from the start.

Both are used through ``ValueModel``: ``init(key) -> params`` and
``apply(params, x_t, t, context, aux) -> [B]``; ``aux`` carries what a model needs beyond the
state (the prompt ids of the reward, the reward statistics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vard_jax.models.nn import layers


def timestep_embedding(timesteps: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [B, dim] of integer timesteps [B] (sin first, period up to 1e4)."""
    return layers.timestep_embedding(timesteps, dim, flip_sin_to_cos=False, freq_shift=0)


class ConvValue(nn.Module):
    """V(x_t, t, c) -> [B]; x_t: [B, C, H, W], timesteps: [B], context: [B, L, D]."""

    width: int = 32
    stages: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        h = jnp.transpose(x, (0, 2, 3, 1))  # NHWC
        condition = jnp.concatenate([timestep_embedding(timesteps, 64),
                                     jnp.mean(context, axis=1)], axis=-1)
        condition = nn.silu(nn.Dense(4 * self.width)(condition))
        h = nn.Conv(self.width, (3, 3))(h)
        for stage in range(self.stages):
            channels = self.width * 2**stage
            h = nn.Conv(channels, (3, 3), strides=(2, 2) if stage else (1, 1))(h)
            h = nn.GroupNorm(num_groups=min(8, channels))(h)
            film = nn.Dense(2 * channels)(condition)[:, None, None, :]
            scale, shift = jnp.split(film, 2, axis=-1)
            h = nn.silu(h * (1.0 + scale) + shift)
            h = nn.silu(nn.Conv(channels, (3, 3))(h))
        h = jnp.mean(h, axis=(1, 2))
        h = nn.silu(nn.Dense(4 * self.width)(jnp.concatenate([h, condition], axis=-1)))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


@dataclasses.dataclass(frozen=True, eq=False)
class ValueModel:
    """A value network behind one interface (see the module docstring)."""

    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array, jax.Array, jax.Array, dict], jax.Array]
    name: str


# One compiled program per architecture, shared by every value model of the process: run op by
# op, the initialisers cost ~12 s of small compiles on CPU, and compiled once ~5 s.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_conv_value(width: int, sample_shape: tuple[int, ...], context_shape: tuple[int, ...],
                     key: jax.Array) -> Any:
    x = jnp.zeros((1,) + sample_shape)
    context = jnp.zeros((1,) + context_shape)
    return ConvValue(width=width).init(key, x, jnp.zeros((1,), jnp.int32), context)["params"]


def conv_value(sample_shape: tuple[int, int, int], context_shape: tuple[int, int],
               width: int) -> ValueModel:
    module = ConvValue(width=width)
    init = functools.partial(_init_conv_value, int(width), tuple(sample_shape),
                             tuple(context_shape))

    def apply(params, x, timesteps, context, aux):
        del aux
        return module.apply({"params": params}, x, timesteps, context)

    return ValueModel(init=init, apply=apply, name="conv")


def conv_x0_value(sample_shape: tuple[int, int, int], context_shape: tuple[int, int],
                  width: int,
                  x0_hat_fn: Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]
                  ) -> ValueModel:
    """``ConvValue`` applied to the frozen reference model's one-step prediction x0_hat(x_t)
    (``x0_hat_fn(aux, x_t, t, context)``, differentiable in x_t) instead of x_t itself.

    Every timestep then shows the network an image on the same scale, so what it learns of
    the reward's dependence on the image at one noise level serves the others.
    """
    inner = conv_value(sample_shape, context_shape, width)

    def apply(params, x, timesteps, context, aux):
        return inner.apply(params, x0_hat_fn(aux, x, timesteps, context), timesteps, context, aux)

    return ValueModel(init=inner.init, apply=apply, name="conv_x0")


class MidFeatureHead(nn.Module):
    """V from UNet mid-block features [B, h, w, C] (NHWC), the timestep and the prompt."""

    width: int = 32

    @nn.compact
    def __call__(self, features: jax.Array, timesteps: jax.Array,
                 context: jax.Array) -> jax.Array:
        condition = jnp.concatenate([timestep_embedding(timesteps, 64),
                                     jnp.mean(context, axis=1)], axis=-1)
        condition = nn.silu(nn.Dense(4 * self.width)(condition))
        h = nn.GroupNorm(num_groups=min(8, features.shape[-1]))(features.astype(jnp.float32))
        h = nn.Conv(4 * self.width, (3, 3))(h)
        film = nn.Dense(8 * self.width)(condition)[:, None, None, :]
        scale, shift = jnp.split(film, 2, axis=-1)
        h = nn.silu(h * (1.0 + scale) + shift)
        h = jnp.mean(h, axis=(1, 2))
        h = nn.silu(nn.Dense(4 * self.width)(jnp.concatenate([h, condition], axis=-1)))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


def unet_head_value(feature_shape: tuple[int, int, int], context_shape: tuple[int, int],
                   width: int,
                   features_fn: Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]
                   ) -> ValueModel:
    """``MidFeatureHead`` on ``features_fn(aux, x_t, t, context)``: the frozen reference UNet's
    mid-block output [B, h, w, C] (``feature_shape`` = (h, w, C)), differentiable in x_t."""
    module = MidFeatureHead(width=width)

    @jax.jit
    def init(key):
        return module.init(key, jnp.zeros((1,) + tuple(feature_shape)), jnp.zeros((1,), jnp.int32),
                           jnp.zeros((1,) + tuple(context_shape)))["params"]

    def apply(params, x, timesteps, context, aux):
        features = features_fn(aux, x, jnp.maximum(timesteps, 0), context)
        return module.apply({"params": params}, features, timesteps, context)

    return ValueModel(init=init, apply=apply, name="unet_head")


class _TimeAffine(nn.Module):
    """(1 + a(t), b(t)) from a timestep embedding; initialised to the identity (a = b = 0)."""

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.silu(nn.Dense(32)(timestep_embedding(timesteps, 32)))
        out = nn.Dense(2, kernel_init=nn.initializers.zeros)(h)
        return 1.0 + out[:, 0], out[:, 1]


def reward_init_value(backbone_score: Callable[[Any, jax.Array, jax.Array], jax.Array],
                      backbone_params: Any,
                      x0_hat_fn: Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array],
                      decode: Callable[[dict, jax.Array], jax.Array]) -> ValueModel:
    """V = (1 + a(t)) * (score(decode(x0_hat(x_t))) - mean) / std + b(t).

    ``backbone_score(params, images, ids) -> [B]`` is the reward network (a trainable copy,
    initialised from the reward's weights); ``x0_hat_fn(aux, x_t, t, context)`` the frozen
    reference model's one-step prediction (differentiable in x_t); ``decode(aux, x0)`` maps
    samples to [0, 1] images. ``aux`` holds ``reward_ids`` (the reward's prompt tokens),
    ``reward_mean``/``reward_std`` (the running statistics) and what the two callables need.
    """
    affine = _TimeAffine()

    def init(key):
        # An own copy: the train state is donated to the update steps, and the reward keeps
        # scoring with its original weights.
        return {"backbone": jax.tree_util.tree_map(jnp.array, backbone_params),
                "affine": init_affine(key)}

    @jax.jit
    def init_affine(key):
        return affine.init(key, jnp.zeros((1,), jnp.int32))["params"]

    def apply(params, x, timesteps, context, aux):
        images = decode(aux, x0_hat_fn(aux, x, timesteps, context))
        raw = backbone_score(params["backbone"], images, aux["reward_ids"])
        standardised = (raw - aux["reward_mean"]) / aux["reward_std"]
        scale, shift = affine.apply({"params": params["affine"]}, timesteps)
        return scale * standardised + shift

    return ValueModel(init=init, apply=apply, name="reward_init")
