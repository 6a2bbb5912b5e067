"""The MMDiT of Stable Diffusion 3 and 3.5 (diffusers' ``SD3Transformer2DModel``) in Flax linen.

Configured from diffusers' ``transformer/config.json`` (``MMDiTConfig.from_dict``).

``SD3Transformer2DModel(config)(hidden_states [B, C, H, W], encoder_hidden_states [B, L, J],
pooled_projections [B, P], timestep [B]) -> [B, out_channels, H, W]`` (NCHW in and out, like the
UNet). The latents are cut into ``patch_size`` squares, each a token with a sin-cos position
taken from the centre of a ``pos_embed_max_size``-square table; the text tokens are projected to
the same width. Every block modulates both streams from one conditioning vector (timestep
embedding + pooled text projection: AdaLN-Zero shift, scale and gate) and lets them attend
jointly over [image tokens; text tokens]; the last block keeps only the image stream. SD 3.5's
``qk_norm="rms_norm"`` normalises queries and keys per head; its ``dual_attention_layers``
(MMDiT-X) add a self-attention over the image tokens alone in those blocks.

Parameter names are the checkpoint's (``transformer_blocks_3/attn/add_q_proj/kernel`` for
``transformer_blocks.3.attn.add_q_proj.weight``), so the PyTorch weights load by name and LoRA
can target ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` (image stream, and the extra
self-attention ``attn2``) and ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``
(text stream). The position table is ``pos_embed/pos_embed`` (diffusers keeps it as a persistent
buffer, so checkpoints carry it): read from the checkpoint, never given a gradient. Block
outputs are tagged ``checkpoint_name(..., "transformer")`` and attention outputs
``"attention"`` for the remat policies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vard_jax.models.nn import attention as attention_lib
from vard_jax.models.nn import layers

CLASS_NAME = "SD3Transformer2DModel"
#: The checkpoint key of the position table (a persistent buffer in diffusers).
POSITION_KEY = "pos_embed.pos_embed"
QK_NORMS = (None, "rms_norm")
_TIME_CHANNELS = 256  # the sinusoidal timestep features before the MLP
_EPS = 1e-6  # every LayerNorm and RMSNorm of the network


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' ``SD3Transformer2DModel`` config (its defaults)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: Optional[int] = 16  # None: in_channels
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any],
                  source: str = "transformer config") -> "MMDiTConfig":
        """Reads a diffusers ``transformer/config.json`` dict; a value this implementation does
        not support raises one ``ValueError`` line naming ``source`` and the field; bookkeeping
        fields (``_diffusers_version``...) are ignored."""
        name = config.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"{source}: _class_name={name!r} is not supported (only "
                             f"{CLASS_NAME!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in config.items() if key in fields}
        if values.get("out_channels", 0) is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        made = cls(**values)
        made.validate(source)
        return made

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def outputs(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def validate(self, source: str = "transformer config") -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"{source}: qk_norm={self.qk_norm!r} is not supported (None or "
                             "'rms_norm')")
        if self.pos_embed_max_size is None:
            raise ValueError(f"{source}: pos_embed_max_size=None is not supported (the SD3 "
                             "position table: an integer)")
        for name in ("sample_size", "patch_size", "in_channels", "num_layers",
                     "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: {name}={value!r} is not supported (a positive "
                                 "integer)")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"{source}: caption_projection_dim={self.caption_projection_dim} "
                             f"is not supported (it must equal num_attention_heads * "
                             f"attention_head_dim = {self.inner_dim})")
        if self.inner_dim % 4:
            raise ValueError(f"{source}: num_attention_heads * attention_head_dim = "
                             f"{self.inner_dim} is not supported (a multiple of 4: the 2-d "
                             "sin-cos positions)")
        if self.sample_size < self.patch_size:
            raise ValueError(f"{source}: sample_size={self.sample_size} is not supported (at "
                             f"least patch_size {self.patch_size})")
        if not isinstance(self.dual_attention_layers, tuple) or not all(
                isinstance(i, int) for i in self.dual_attention_layers):
            raise ValueError(f"{source}: dual_attention_layers="
                             f"{self.dual_attention_layers!r} is not supported (layer indices)")


def position_table(config: MMDiTConfig) -> jax.Array:
    """The sin-cos table diffusers builds for ``pos_embed.pos_embed``: [1, M * M, D] for the
    M x M grid (M = ``pos_embed_max_size``), row-major; grid units are rescaled so that M
    cells span ``sample_size / patch_size``. A token's first D/2 features encode its column,
    the last D/2 its row, each as [sin, cos] at the frequencies 10000^(-k / (D/4))."""
    size, dim = config.pos_embed_max_size, config.inner_dim
    base = config.sample_size // config.patch_size
    grid = jnp.arange(size, dtype=jnp.float32) / jnp.float32(size / base)
    quarter = dim // 4
    omega = jnp.asarray([1.0 / 10000 ** (k / quarter) for k in range(quarter)], jnp.float32)
    angles = grid[:, None] * omega[None, :]  # [M, D/4]
    axis = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [M, D/2]
    columns = jnp.broadcast_to(axis[None, :, :], (size, size, dim // 2))
    rows = jnp.broadcast_to(axis[:, None, :], (size, size, dim // 2))
    return jnp.concatenate([columns, rows], axis=-1).reshape(1, size * size, dim)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without scale and bias (statistics in float32), in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis (per head), float32 statistics."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _EPS)
        return (x32 * scale).astype(self.dtype)


class Modulation(nn.Module):
    """SiLU then one Dense to ``chunks`` vectors of the stream's width (the ``linear`` of
    diffusers' AdaLayerNormZero / SD35AdaLayerNormZeroX / AdaLayerNormContinuous)."""

    features: int
    chunks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, temb):
        out = nn.Dense(self.features * self.chunks, dtype=self.dtype, name="linear")(
            nn.silu(temb))
        return jnp.split(out, self.chunks, axis=-1)


class JointAttention(nn.Module):
    """Attention over the image tokens ``x`` and, when given, the text tokens ``context``
    jointly (their own projections ``add_*``); returns the two parts of the output.
    ``context_pre_only``: the text part is not projected out (the last block drops it)."""

    heads: int
    head_dim: int
    qk_norm: Optional[str] = None
    context_pre_only: bool = False
    dtype: Any = jnp.float32
    implementation: str = "xla"

    def _heads(self, x, names):
        inner = self.heads * self.head_dim
        q, k, v = (attention_lib.split_heads(nn.Dense(inner, dtype=self.dtype, name=n)(x),
                                             self.heads) for n in names[:3])
        if self.qk_norm == "rms_norm":
            q = RMSNorm(self.dtype, name=names[3])(q)
            k = RMSNorm(self.dtype, name=names[4])(k)
        return q, k, v

    @nn.compact
    def __call__(self, x, context=None):
        features, image_tokens = x.shape[-1], x.shape[1]
        q, k, v = self._heads(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        if context is not None:
            cq, ck, cv = self._heads(context, ("add_q_proj", "add_k_proj", "add_v_proj",
                                               "norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = attention_lib.attention(q, k, v, implementation=self.implementation)
        out = checkpoint_name(attention_lib.merge_heads(out), "attention")
        image = nn.Dense(features, dtype=self.dtype, name="to_out_0")(out[:, :image_tokens])
        text = None
        if context is not None and not self.context_pre_only:
            text = nn.Dense(context.shape[-1], dtype=self.dtype, name="to_add_out")(
                out[:, image_tokens:])
        return image, text


class _GeluProjection(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jax.nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="proj")(x),
                           approximate=True)


class FeedForward(nn.Module):
    """Dense to 4x width, tanh-approximated GELU, Dense back (``net_0/proj``, ``net_2``)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _GeluProjection(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class JointTransformerBlock(nn.Module):
    """One MMDiT block: AdaLN-Zero on both streams, joint attention, (MMDiT-X: a gated
    self-attention on the image stream), gated feed-forwards. Returns (image, text); text is
    None after a ``context_pre_only`` block."""

    heads: int
    head_dim: int
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: Optional[str] = None
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, context, temb):
        dim = x.shape[-1]
        attn = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                    dtype=self.dtype, implementation=self.implementation)
        mods = Modulation(dim, 9 if self.dual_attention else 6, self.dtype, name="norm1")(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = _layer_norm(x)
        if self.context_pre_only:  # AdaLayerNormContinuous: scale first, then shift
            c_scale, c_shift = Modulation(dim, 2, self.dtype, name="norm1_context")(temb)
            context_in = _modulate(_layer_norm(context), c_shift, c_scale)
        else:
            c_mods = Modulation(dim, 6, self.dtype, name="norm1_context")(temb)
            context_in = _modulate(_layer_norm(context), c_mods[0], c_mods[1])
        image_out, text_out = JointAttention(**attn, context_pre_only=self.context_pre_only,
                                             name="attn")(_modulate(normed, shift_msa, scale_msa),
                                                          context_in)
        x = x + gate_msa[:, None] * image_out
        if self.dual_attention:
            shift2, scale2, gate2 = mods[6:]
            extra, _ = JointAttention(**attn, name="attn2")(_modulate(normed, shift2, scale2))
            x = x + gate2[:, None] * extra
        h = FeedForward(self.dtype, name="ff")(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
        x = checkpoint_name(x + gate_mlp[:, None] * h, "transformer")
        if self.context_pre_only:
            return x, None
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods[2:]
        context = context + c_gate_msa[:, None] * text_out
        h = FeedForward(self.dtype, name="ff_context")(
            _modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, checkpoint_name(context + c_gate_mlp[:, None] * h, "transformer")


class PatchEmbed(nn.Module):
    """Patches -> tokens (a stride-``patch_size`` conv ``proj``) plus the centre crop of the
    position table ``pos_embed`` (the checkpoint's; no gradient)."""

    config: MMDiTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        patch, size, dim = cfg.patch_size, cfg.pos_embed_max_size, cfg.inner_dim
        x = nn.Conv(dim, (patch, patch), strides=(patch, patch), padding="VALID",
                    dtype=self.dtype, name="proj")(x)
        batch, height, width, _ = x.shape
        if height > size or width > size:
            raise ValueError(f"latents of {height} x {width} patches exceed the position table "
                             f"(pos_embed_max_size {size})")
        table = self.param("pos_embed", lambda key, shape: position_table(cfg),
                           (1, size * size, dim))
        table = jax.lax.stop_gradient(table).reshape(size, size, dim)
        top, left = (size - height) // 2, (size - width) // 2
        crop = table[top:top + height, left:left + width]
        return (x + crop[None].astype(x.dtype)).reshape(batch, height * width, dim)


class TimeTextEmbed(nn.Module):
    """Sinusoidal timestep features -> MLP, plus the pooled text embedding -> MLP."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep, pooled):
        t = layers.timestep_embedding(timestep, _TIME_CHANNELS, True, 0)
        t = layers.TimestepEmbedding(self.features, self.dtype, name="timestep_embedder")(
            t.astype(self.dtype))
        text = layers.TimestepEmbedding(self.features, self.dtype, name="text_embedder")(pooled)
        return t + text


class SD3Transformer2DModel(nn.Module):
    """See the module docstring. ``implementation``: the attention kernel (``attention.py``)."""

    config: MMDiTConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        cfg = self.config
        attention_lib.check_implementation(self.implementation)
        batch, _, height, width = hidden_states.shape
        patch, dim = cfg.patch_size, cfg.inner_dim
        x = PatchEmbed(cfg, self.dtype, name="pos_embed")(
            jnp.transpose(hidden_states, (0, 2, 3, 1)).astype(self.dtype))
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
        temb = TimeTextEmbed(dim, self.dtype, name="time_text_embed")(
            timestep, jnp.asarray(pooled_projections).astype(self.dtype))
        context = nn.Dense(cfg.caption_projection_dim, dtype=self.dtype, name="context_embedder")(
            jnp.asarray(encoder_hidden_states).astype(self.dtype))
        last = cfg.num_layers - 1
        for index in range(cfg.num_layers):
            x, context = JointTransformerBlock(
                cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only=index == last,
                dual_attention=index in cfg.dual_attention_layers, qk_norm=cfg.qk_norm,
                dtype=self.dtype, implementation=self.implementation,
                name=f"transformer_blocks_{index}")(x, context, temb)
        scale, shift = Modulation(dim, 2, self.dtype, name="norm_out")(temb)
        x = _modulate(_layer_norm(x), shift, scale)
        x = nn.Dense(patch * patch * cfg.outputs, dtype=self.dtype, name="proj_out")(x)
        rows, cols = height // patch, width // patch
        x = x.reshape(batch, rows, cols, patch, patch, cfg.outputs)
        x = jnp.einsum("nhwpqc->nchpwq", x)
        return x.reshape(batch, cfg.outputs, rows * patch, cols * patch)

    def init_params(self, key: jax.Array, batch: int = 1, context_length: int = 1) -> Any:
        """Randomly initialised parameters (shapes only under ``jax.eval_shape``); the
        position table starts as diffusers' sin-cos table."""
        cfg = self.config
        sample = jnp.zeros((batch, cfg.in_channels, cfg.patch_size, cfg.patch_size))
        context = jnp.zeros((batch, context_length, cfg.joint_attention_dim))
        pooled = jnp.zeros((batch, cfg.pooled_projection_dim))
        return self.init(key, sample, context, pooled, jnp.zeros((batch,)))["params"]

