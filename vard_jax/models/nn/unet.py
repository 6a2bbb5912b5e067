"""The conditional UNet of the Stable Diffusion family (SD 1.x, SD 2.x, SDXL) in Flax linen.

Configured from diffusers' ``unet/config.json`` (``unet_config.UNetConfig.from_dict``).

``UNet2DConditionModel(config)(sample [B, C, H, W], timesteps [B], context [B, L, D],
added_cond=None) -> UNetOutput(sample [B, C, H, W], mid [B, h, w, C_mid])``: the noise (or v)
prediction, and the mid-block features (the value head option that reads the UNet's features).
SDXL's ``added_cond`` is ``{"text_embeds": [B, P], "time_ids": [B, 6]}``.

Parameter names follow the public checkpoints (``down_blocks_0/resnets_1/conv1/kernel`` for
``down_blocks.0.resnets.1.conv1.weight``); activations are tagged with
``jax.ad_checkpoint.checkpoint_name`` (``resnet``, ``attention``, ``transformer``) for remat
policies that keep or recompute them by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vard_jax.models.nn import attention as attention_lib
from vard_jax.models.nn import layers
from vard_jax.models.nn.unet_config import CROSS_DOWN, CROSS_UP, UNetConfig

class Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (to_q, to_k, to_v, to_out_0)."""

    heads: int
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, context=None):
        features = x.shape[-1]
        context = x if context is None else context
        q = nn.Dense(features, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(features, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(features, use_bias=False, dtype=self.dtype, name="to_v")(context)
        split = attention_lib.split_heads
        out = attention_lib.attention(split(q, self.heads), split(k, self.heads),
                                      split(v, self.heads), implementation=self.implementation)
        out = checkpoint_name(attention_lib.merge_heads(out), "attention")
        return nn.Dense(features, dtype=self.dtype, name="to_out_0")(out)


class TransformerBlock(nn.Module):
    """Self-attention (or cross-only), cross-attention and GEGLU feed-forward, pre-LayerNorm."""

    heads: int
    only_cross_attention: bool = False
    geglu_approximate: bool = False
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, context):
        attn = dict(heads=self.heads, dtype=self.dtype, implementation=self.implementation)
        h = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
        x = x + Attention(**attn, name="attn1")(h, context if self.only_cross_attention else None)
        h = nn.LayerNorm(epsilon=1e-5, name="norm2")(x)
        x = x + Attention(**attn, name="attn2")(h, context)
        h = nn.LayerNorm(epsilon=1e-5, name="norm3")(x)
        return x + _FeedForwardNamed(self.geglu_approximate, self.dtype, name="ff")(h)


class _FeedForwardNamed(nn.Module):
    """The feed-forward with the checkpoint's names: ``ff/net_0/proj``, ``ff/net_2``."""

    approximate: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        h = _Projection(features * 8, self.dtype, name="net_0")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * jax.nn.gelu(gate, approximate=self.approximate)
        return nn.Dense(features, dtype=self.dtype, name="net_2")(h)


class _Projection(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, name="proj")(x)


class Transformer2D(nn.Module):
    """GroupNorm, projection in, ``depth`` transformer blocks over the H*W tokens, projection
    out, residual."""

    heads: int
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    geglu_approximate: bool = False
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, context):
        batch, height, width, channels = x.shape
        residual = x
        h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_in")(
                h.reshape(batch, height * width, channels))
        else:
            h = layers.conv(channels, "proj_in", self.dtype, kernel=1)(h)
            h = h.reshape(batch, height * width, channels)
        for index in range(self.depth):
            h = TransformerBlock(self.heads, self.only_cross_attention, self.geglu_approximate,
                                 self.dtype, self.implementation,
                                 name=f"transformer_blocks_{index}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = h.reshape(batch, height, width, channels)
            h = layers.conv(channels, "proj_out", self.dtype, kernel=1)(h)
        return checkpoint_name(h + residual, "transformer")


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The settings of the transformers of one block (``Transformer2D`` fields)."""

    heads: int
    depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    geglu_approximate: bool = False
    dtype: Any = jnp.float32
    implementation: str = "xla"

    def build(self, name: str) -> "Transformer2D":
        return Transformer2D(**dataclasses.asdict(self), name=name)


class DownBlock(nn.Module):
    """``layers`` resnets (each followed by a transformer in a cross-attention block), then a
    stride-2 conv unless it is the last block. Returns the output and the skip activations."""

    features: int
    layers: int
    transformer: Optional[TransformerSpec]  # None: DownBlock2D
    downsample: bool
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for layer in range(self.layers):
            x = layers.ResnetBlock(self.features, self.groups, self.eps, self.dtype,
                            name=f"resnets_{layer}")(x, temb)
            if self.transformer is not None:
                x = self.transformer.build(f"attentions_{layer}")(x, context)
            skips.append(x)
        if self.downsample:
            x = layers.Downsample(self.features, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, then (transformer, resnet)."""

    transformer: TransformerSpec
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        features = x.shape[-1]
        resnet = functools.partial(layers.ResnetBlock, features, self.groups, self.eps,
                                   self.dtype)
        x = resnet(name="resnets_0")(x, temb)
        x = self.transformer.build("attentions_0")(x, context)
        return resnet(name="resnets_1")(x, temb)


class UpBlock(nn.Module):
    """``layers`` resnets, each on the output concatenated with the next skip (last first),
    each followed by a transformer in a cross-attention block; nearest x2 then conv unless it
    is the last block."""

    features: int
    layers: int
    transformer: Optional[TransformerSpec]
    upsample: bool
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for layer in range(self.layers):
            x = jnp.concatenate([x, skips[-1 - layer]], axis=-1)
            x = layers.ResnetBlock(self.features, self.groups, self.eps, self.dtype,
                            name=f"resnets_{layer}")(x, temb)
            if self.transformer is not None:
                x = self.transformer.build(f"attentions_{layer}")(x, context)
        if self.upsample:
            x = layers.Upsample(self.features, self.dtype, name="upsamplers_0")(x)
        return x


class UNetOutput(NamedTuple):
    sample: jax.Array  # [B, C, H, W] the prediction (eps or v)
    mid: jax.Array  # [B, h, w, C] the mid block's output (NHWC)


class UNet2DConditionModel(nn.Module):
    """See the module docstring. ``implementation``: the attention kernel (``attention.py``)."""

    config: UNetConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    def _transformer(self, block: int) -> TransformerSpec:
        cfg = self.config
        return TransformerSpec(cfg.heads[block], cfg.depths[block], cfg.use_linear_projection,
                               cfg.cross_only[block], cfg.norm_num_groups, cfg.geglu_approximate,
                               self.dtype, self.implementation)

    def _time_embedding(self, timesteps, batch, added_cond):
        cfg = self.config
        channels = cfg.block_out_channels[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t = layers.timestep_embedding(timesteps, channels, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = layers.TimestepEmbedding(channels * 4, self.dtype, name="time_embedding")(
            t.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs "
                                 "added_cond={'text_embeds': [B, P], 'time_ids': [B, 6]}")
            time_ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
            ids = layers.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                            cfg.flip_sin_to_cos, cfg.freq_shift)
            extra = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32),
                                     ids.reshape(time_ids.shape[0], -1)], axis=-1)
            added = layers.TimestepEmbedding(channels * 4, self.dtype, name="add_embedding")
            temb = temb + added(extra.astype(self.dtype))
        return temb

    @nn.compact
    def __call__(self, sample, timesteps, context, added_cond=None) -> UNetOutput:
        cfg = self.config
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype)
        temb = self._time_embedding(timesteps, sample.shape[0], added_cond)
        x = layers.conv(cfg.block_out_channels[0], "conv_in", self.dtype)(
            jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
        skips = [x]
        last = cfg.blocks - 1
        for block, kind in enumerate(cfg.down_block_types):
            transformer = self._transformer(block) if kind == CROSS_DOWN else None
            x, block_skips = DownBlock(cfg.block_out_channels[block], cfg.layers_per_block,
                                       transformer, block != last, **norm,
                                       name=f"down_blocks_{block}")(x, temb, context)
            skips += block_skips
        if cfg.mid_block_type is not None:
            x = MidBlock(self._transformer(last), **norm, name="mid_block")(x, temb, context)
        mid = x
        for block, kind in enumerate(cfg.up_block_types):
            features = cfg.block_out_channels[last - block]
            transformer = self._transformer(last - block) if kind == CROSS_UP else None
            count = cfg.layers_per_block + 1
            block_skips, skips = skips[-count:], skips[:-count]
            x = UpBlock(features, count, transformer, block != last, **norm,
                        name=f"up_blocks_{block}")(x, block_skips, temb, context)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(x)
        x = layers.conv(cfg.out_channels, "conv_out", self.dtype)(nn.silu(x))
        return UNetOutput(jnp.transpose(x, (0, 3, 1, 2)), mid)

    def init_params(self, key: jax.Array, batch: int = 1, context_length: int = 1) -> Any:
        """Randomly initialised parameters (shapes only under ``jax.eval_shape``)."""
        cfg = self.config
        sample = jnp.zeros((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size))
        context = jnp.zeros((batch, context_length, cfg.cross_attention_dim))
        added = None
        if cfg.addition_embed_type == "text_time":
            ids = 6
            text = cfg.projection_class_embeddings_input_dim - ids * cfg.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, text)), "time_ids": jnp.zeros((batch, ids))}
        return self.init(key, sample, jnp.zeros((batch,)), context, added)["params"]
