"""The KL autoencoder of latent diffusion (``AutoencoderKL``) in Flax linen.

Configured from diffusers' ``vae/config.json`` (``VAEConfig.from_dict``). Images and latents are
NCHW as in diffusers: ``encode(images [B, 3, H, W] in [-1, 1]) -> (mean, logvar)`` of the latent
Gaussian [B, C, h, w]; ``decode(latents [B, C, h, w]) -> images``. The latents the diffusion
model sees are ``(mean - shift_factor) * scaling_factor`` (``VAEConfig.to_model_latents``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vard_jax.models.nn import attention as attention_lib
from vard_jax.models.nn.layers import Downsample, ResnetBlock, Upsample, conv

_EPS = 1e-6  # every normalisation of the autoencoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None  # SD3 / FLUX: latents shifted before scaling
    use_quant_conv: bool = True  # SD3 / FLUX VAEs have neither 1x1 conv
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    _BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
        for key, kind in cls._BLOCKS.items():
            for block in config.get(key, ()):
                if block != kind:
                    raise ValueError(f"{source}: {key} entry {block!r} is not supported ({kind})")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: act_fn {config['act_fn']!r} is not supported (silu)")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                  if k in fields and (v is not None or k == "shift_factor")}
        made = cls(**values)
        if any(c % made.norm_num_groups for c in made.block_out_channels):
            raise ValueError(f"{source}: block channels {made.block_out_channels} are not "
                             f"multiples of norm_num_groups {made.norm_num_groups}")
        return made

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        blocks = len(self.block_out_channels)
        out.update(down_block_types=[self._BLOCKS["down_block_types"]] * blocks,
                   up_block_types=[self._BLOCKS["up_block_types"]] * blocks, act_fn="silu")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_model_latents(self, mean: jax.Array) -> jax.Array:
        return (mean - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_model_latents(self, latents: jax.Array) -> jax.Array:
        return latents / self.scaling_factor + (self.shift_factor or 0.0)


class SpatialAttention(nn.Module):
    """One-head self-attention over the H*W positions, with a GroupNorm and a residual."""

    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = nn.GroupNorm(self.groups, epsilon=_EPS, name="group_norm")(x)
        h = h.reshape(batch, height * width, 1, channels)
        q, k, v = (nn.Dense(channels, dtype=self.dtype, name=name)(h)
                   for name in ("query", "key", "value"))
        out = attention_lib.attention(q, k, v).reshape(batch, height * width, channels)
        out = nn.Dense(channels, dtype=self.dtype, name="proj_attn")(out)
        return x + out.reshape(batch, height, width, channels)


class _MidBlock(nn.Module):
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        x = ResnetBlock(features, self.groups, _EPS, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(features, self.groups, _EPS, self.dtype, name="resnets_1")(x)


class _ResnetStack(nn.Module):
    """``layers`` resnets, then a stride-2 conv (``"down"``), an upsampling (``"up"``) or
    nothing (``""``)."""

    features: int
    layers: int
    resample: str
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for layer in range(self.layers):
            x = ResnetBlock(self.features, self.groups, _EPS, self.dtype,
                            name=f"resnets_{layer}")(x)
        if self.resample == "down":
            x = Downsample(self.features, "asymmetric", self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = conv(cfg.block_out_channels[0], "conv_in", self.dtype)(x)
        last = len(cfg.block_out_channels) - 1
        for block, features in enumerate(cfg.block_out_channels):
            x = _ResnetStack(features, cfg.layers_per_block, "down" if block != last else "",
                             cfg.norm_num_groups, self.dtype, name=f"down_blocks_{block}")(x)
        x = _MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                      name="mid_block")(x)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=_EPS, name="conv_norm_out")(x)
        return conv(2 * cfg.latent_channels, "conv_out", self.dtype)(nn.silu(x))


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], "conv_in", self.dtype)(z)
        x = _MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                      name="mid_block")(x)
        last = len(channels) - 1
        for block, features in enumerate(channels):
            x = _ResnetStack(features, cfg.layers_per_block + 1, "up" if block != last else "",
                             cfg.norm_num_groups, self.dtype, name=f"up_blocks_{block}")(x)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=_EPS, name="conv_norm_out")(x)
        return conv(cfg.out_channels, "conv_out", self.dtype)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """See the module docstring; ``__call__`` encodes then decodes the mean (for ``init``)."""

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, 3, H, W] in [-1, 1] -> (mean, logvar) [B, C, h, w] (logvar clipped to [-30, 20])."""
        moments = self.encoder(jnp.transpose(images, (0, 2, 3, 1)).astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(jnp.transpose(moments, (0, 3, 1, 2)), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """[B, C, h, w] autoencoder latents (not scaled) -> images [B, 3, H, W] in ~[-1, 1]."""
        z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)

    def init_params(self, key: jax.Array) -> Any:
        size = self.config.sample_size
        return self.init(key, jnp.zeros((1, self.config.in_channels, size, size)))["params"]
