"""The conditional UNet of the Stable Diffusion family (SD 1.x, SD 2.x, SDXL) in Flax linen.

Configured from diffusers' ``unet/config.json`` (``UNetConfig.from_dict``). As in diffusers,
``attention_head_dim`` of these configs counts *heads* (a naming slip diffusers kept for
compatibility); ``num_attention_heads`` overrides it when set.

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
import math
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vard_jax.models.nn import attention as attention_lib

_CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


def _per_block(value: Any, count: int, name: str) -> tuple:
    """An int/bool or a per-block list of them as a tuple of ``count`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"unet config: {name} has {len(value)} entries for {count} blocks")
        return tuple(value)
    return (value,) * count


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` config that this implementation reads."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN)
    up_block_types: tuple[str, ...] = (_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP)
    mid_block_type: Optional[str] = _MID
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: Any = 8  # heads per block (int or per-block list), see module doc
    num_attention_heads: Any = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: Any = 1  # int or per-block list (SDXL: [1, 2, 10])
    only_cross_attention: Any = False
    use_linear_projection: bool = False  # SD 2.x, SDXL: Dense instead of 1x1 conv around attention
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: Optional[str] = None  # SDXL: "text_time"
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    # Not a diffusers field: the feed-forward gate's GELU by its tanh approximation. The shapes
    # world's shipped UNet was trained so (Flax's default GELU); PyTorch checkpoints use exact.
    geglu_approximate: bool = False

    #: diffusers fields with the only value this implementation supports.
    _FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
              "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type":
              "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
              "conv_out_kernel": 3, "mid_block_only_cross_attention": None,
              "num_class_embeds": None, "class_embeddings_concat": False,
              "time_cond_proj_dim": None, "attention_type": "default",
              "dual_cross_attention": False, "cross_attention_norm": None,
              "reverse_transformer_layers_per_block": None, "mid_block_scale_factor": 1}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
        """Reads a diffusers ``unet/config.json`` dict; unknown fields that change the network
        raise one ``ValueError`` line, bookkeeping fields (``_class_name``...) are ignored."""
        for name, supported in cls._FIXED.items():
            if name in config and config[name] != supported and not (
                    supported is None and config[name] in (None, False)):
                raise ValueError(f"{source}: {name}={config[name]!r} is not supported (only "
                                 f"{supported!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        nullable = ("num_attention_heads", "mid_block_type", "addition_embed_type")
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in config.items()
                  if key in fields and (value is not None or key in nullable)}
        made = cls(**values)
        made.validate(source)
        return made

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config fields (without the project-only ones)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("geglu_approximate")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        value = self.num_attention_heads or self.attention_head_dim
        return tuple(int(v) for v in _per_block(value, self.blocks, "attention heads"))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(int(v) for v in _per_block(self.transformer_layers_per_block, self.blocks,
                                                "transformer_layers_per_block"))

    @property
    def cross_only(self) -> tuple[bool, ...]:
        return tuple(bool(v) for v in _per_block(self.only_cross_attention, self.blocks,
                                                 "only_cross_attention"))

    def validate(self, source: str = "unet config") -> None:
        count = self.blocks
        if len(self.down_block_types) != count or len(self.up_block_types) != count:
            raise ValueError(f"{source}: {count} block_out_channels but "
                             f"{len(self.down_block_types)} down and {len(self.up_block_types)} "
                             "up blocks")
        for kind in self.down_block_types:
            if kind not in (_CROSS_DOWN, _DOWN):
                raise ValueError(f"{source}: down block {kind!r} is not supported ({_CROSS_DOWN}"
                                 f", {_DOWN})")
        for kind in self.up_block_types:
            if kind not in (_CROSS_UP, _UP):
                raise ValueError(f"{source}: up block {kind!r} is not supported ({_CROSS_UP}, "
                                 f"{_UP})")
        if self.mid_block_type not in (_MID, None):
            raise ValueError(f"{source}: mid block {self.mid_block_type!r} is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"{source}: addition_embed_type {self.addition_embed_type!r} is not "
                             "supported (None or 'text_time')")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"{source}: block channels {channels} are not a multiple of "
                                 f"norm_num_groups {self.norm_num_groups}")
        for per_block in (self.heads, self.depths, self.cross_only):  # lengths checked
            assert len(per_block) == count


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


def _conv(features: int, name: str, dtype: Any, kernel: int = 3, stride: int = 1) -> nn.Conv:
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
        h = _conv(self.features, "conv1", self.dtype)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h)
        h = _conv(self.features, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.features:
            x = _conv(self.features, "conv_shortcut", self.dtype, kernel=1)(x)
        return checkpoint_name(x + h, "resnet")


class Downsample(nn.Module):
    features: int
    padding: str = "symmetric"  # the VAE pads (0, 1) then convolves without padding
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == "symmetric":
            return _conv(self.features, "conv", self.dtype, stride=2)(x)
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
        return _conv(self.features, "conv", self.dtype)(x)


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
            h = _conv(channels, "proj_in", self.dtype, kernel=1)(h)
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
            h = _conv(channels, "proj_out", self.dtype, kernel=1)(h)
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
            x = ResnetBlock(self.features, self.groups, self.eps, self.dtype,
                            name=f"resnets_{layer}")(x, temb)
            if self.transformer is not None:
                x = self.transformer.build(f"attentions_{layer}")(x, context)
            skips.append(x)
        if self.downsample:
            x = Downsample(self.features, dtype=self.dtype, name="downsamplers_0")(x)
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
        x = ResnetBlock(features, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
        x = self.transformer.build("attentions_0")(x, context)
        return ResnetBlock(features, self.groups, self.eps, self.dtype, name="resnets_1")(x, temb)


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
            x = ResnetBlock(self.features, self.groups, self.eps, self.dtype,
                            name=f"resnets_{layer}")(x, temb)
            if self.transformer is not None:
                x = self.transformer.build(f"attentions_{layer}")(x, context)
        if self.upsample:
            x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
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
        t = timestep_embedding(timesteps, channels, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(channels * 4, self.dtype, name="time_embedding")(
            t.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs "
                                 "added_cond={'text_embeds': [B, P], 'time_ids': [B, 6]}")
            time_ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
            ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift)
            extra = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32),
                                     ids.reshape(time_ids.shape[0], -1)], axis=-1)
            temb = temb + TimestepEmbedding(channels * 4, self.dtype, name="add_embedding")(
                extra.astype(self.dtype))
        return temb

    @nn.compact
    def __call__(self, sample, timesteps, context, added_cond=None) -> UNetOutput:
        cfg = self.config
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=self.dtype)
        temb = self._time_embedding(timesteps, sample.shape[0], added_cond)
        x = _conv(cfg.block_out_channels[0], "conv_in", self.dtype)(
            jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
        skips = [x]
        last = cfg.blocks - 1
        for block, kind in enumerate(cfg.down_block_types):
            transformer = self._transformer(block) if kind == _CROSS_DOWN else None
            x, block_skips = DownBlock(cfg.block_out_channels[block], cfg.layers_per_block,
                                       transformer, block != last, **norm,
                                       name=f"down_blocks_{block}")(x, temb, context)
            skips += block_skips
        if cfg.mid_block_type is not None:
            x = MidBlock(self._transformer(last), **norm, name="mid_block")(x, temb, context)
        mid = x
        for block, kind in enumerate(cfg.up_block_types):
            features = cfg.block_out_channels[last - block]
            transformer = self._transformer(last - block) if kind == _CROSS_UP else None
            count = cfg.layers_per_block + 1
            block_skips, skips = skips[-count:], skips[:-count]
            x = UpBlock(features, count, transformer, block != last, **norm,
                        name=f"up_blocks_{block}")(x, block_skips, temb, context)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(x)
        x = _conv(cfg.out_channels, "conv_out", self.dtype)(nn.silu(x))
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
