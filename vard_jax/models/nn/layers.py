"""Building blocks the UNet and the VAE share: the sinusoidal timestep embedding, its MLP,
convolutions with "same" padding, the resnet block, down- and up-sampling (NHWC)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float) -> jax.Array:
    """Sinusoidal embeddings [B, dim] of (possibly fractional) timesteps [B]."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


def conv(features: int, name: str, dtype: Any, kernel: int = 3, stride: int = 1) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding, twice; 1x1 shortcut when the
    channel count changes. ``temb`` None: no time conditioning (the VAE's blocks)."""

    features: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1")(x)
        h = conv(self.features, "conv1", self.dtype)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h)
        h = conv(self.features, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.features:
            x = conv(self.features, "conv_shortcut", self.dtype, kernel=1)(x)
        return checkpoint_name(x + h, "resnet")


class Downsample(nn.Module):
    features: int
    padding: str = "symmetric"  # the VAE pads (0, 1) then convolves without padding
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == "symmetric":
            return conv(self.features, "conv", self.dtype, stride=2)(x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.features, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       name="conv")(x)


class Upsample(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        x = jax.image.resize(x, (batch, height * 2, width * 2, channels), "nearest")
        return conv(self.features, "conv", self.dtype)(x)
