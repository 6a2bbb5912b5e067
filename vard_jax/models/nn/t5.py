"""T5's encoder (Raffel et al., 2020) in Flax linen: Stable Diffusion 3's third text encoder.

Configured from a transformers T5 ``config.json`` (``T5Config.from_dict``). ``T5EncoderModel``:
``(input_ids [B, L], attention_mask [B, L] or None) -> last_hidden_state [B, L, d_model]``, the
output of the final layer norm (SD3 conditions on it as it is, and passes no attention mask).

The token embedding ``shared`` is not scaled and there are no position embeddings. Each block is
pre-norm with T5's layer norm (a scale only: no mean subtraction, no bias, the mean square in
float32), then

* self-attention whose scores are *not* divided by sqrt(d_kv) and get a learned bias per head
  and bucket of relative position (bidirectional: half the buckets for keys after the query;
  exact for small distances, logarithmic up to ``relative_attention_max_distance``). Block 0
  owns the bias table; the bias it computes is shared by all blocks. ``attention_mask``
  (1 = token) keeps keys at padding out;
* a feed-forward layer: ``wo(act(wi_0 x) * wi_1 x)`` when gated (``"gated-gelu"``, T5 v1.1,
  with the tanh GELU) or ``wo(act(wi x))`` (``"relu"``, the original T5); no biases anywhere.

Parameter names mirror the PyTorch state dict (``shared/embedding``,
``encoder/block/0/layer/0/SelfAttention/q/kernel``, ``encoder/block/0/layer/1/DenseReluDense/
wi_0/kernel``) and norm scales keep the name ``weight``, as in transformers' Flax T5.
``dtype`` is the computation dtype (bfloat16 on accelerators); parameters stay float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.models.nn import attention as attention_lib

#: ``dense_act_fn`` values (transformers' names) the feed-forward layer supports.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers T5 ``config.json`` the encoder uses (defaults: t5-small)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    pad_token_id: int = 0
    eos_token_id: Any = 1

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        """The activation, derived from ``feed_forward_proj`` as transformers does (a
        ``dense_act_fn`` stored in the config is ignored there too)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "T5 config") -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        made = cls(**{k: v for k, v in config.items() if k in names and v is not None})
        made.validate(source)
        return made

    def validate(self, source: str) -> None:
        parts = self.feed_forward_proj.split("-")
        if (len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated")
                or self.dense_act_fn not in ACTIVATIONS):
            raise ValueError(f"{source}: feed_forward_proj {self.feed_forward_proj!r} is not "
                             f"supported ({', '.join(ACTIVATIONS)}, each optionally 'gated-')")
        buckets, distance = (self.relative_attention_num_buckets,
                             self.relative_attention_max_distance)
        if buckets < 4 or distance <= buckets // 4:
            raise ValueError(f"{source}: relative_attention_num_buckets {buckets} with "
                             f"relative_attention_max_distance {distance} is not supported (at "
                             "least 4 buckets, a distance above a quarter of them)")

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), dense_act_fn=self.dense_act_fn,
                    is_gated_act=self.is_gated_act, model_type="t5",
                    architectures=["T5EncoderModel"])


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """[Lq, Lk] int32 bucket of each key position relative to each query (bidirectional).

    Host numpy in float32, in the order of operations of transformers'
    ``T5Attention._relative_position_bucket`` (so that distances on a bucket boundary round the
    same way), and independent of the accelerator.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
               mask: Optional[jax.Array], implementation: str) -> jax.Array:
    """softmax(q k^T + bias) v of [B, L, H, D] heads, the scores unscaled; ``bias``
    [1, H, Lq, Lk], ``mask`` [B, 1, 1, Lk] boolean (True = attend) or None."""
    return attention_lib.attention(query, key, value, mask=mask, bias=bias, scale=1.0,
                                   implementation=implementation)


class T5LayerNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the mean square in float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return weight.astype(self.dtype) * (x32 * jax.lax.rsqrt(variance + self.eps)).astype(
            self.dtype)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, name=name)


class _SelfAttention(nn.Module):
    config: T5Config
    has_relative_bias: bool
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, bias):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (attention_lib.split_heads(_dense(inner, self.dtype, name)(x), cfg.num_heads)
                   for name in ("q", "k", "v"))
        if self.has_relative_bias:
            buckets = relative_position_buckets(x.shape[1], x.shape[1],
                                                cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=self.dtype,
                             name="relative_attention_bias")
            bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, H, L, L]
        out = _attention(q, k, v, bias, mask, self.implementation)
        return _dense(cfg.d_model, self.dtype, "o")(attention_lib.merge_heads(out)), bias


class _DenseReluDense(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = (act(_dense(cfg.d_ff, self.dtype, "wi_0")(x))
                 * _dense(cfg.d_ff, self.dtype, "wi_1")(x))
        else:
            h = act(_dense(cfg.d_ff, self.dtype, "wi")(x))
        return _dense(cfg.d_model, self.dtype, "wo")(h)


class _SelfAttentionLayer(nn.Module):
    config: T5Config
    has_relative_bias: bool
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, bias):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        out, bias = _SelfAttention(self.config, self.has_relative_bias, self.dtype,
                                   self.implementation, name="SelfAttention")(h, mask, bias)
        return x + out, bias


class _FeedForwardLayer(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + _DenseReluDense(self.config, self.dtype, name="DenseReluDense")(h)


class _BlockLayers(nn.Module):
    """A block's ``layer`` list: self-attention (``0``), feed-forward (``1``)."""

    config: T5Config
    has_relative_bias: bool
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, bias):
        x, bias = _SelfAttentionLayer(self.config, self.has_relative_bias, self.dtype,
                                      self.implementation, name="0")(x, mask, bias)
        return _FeedForwardLayer(self.config, self.dtype, name="1")(x), bias


class _Block(nn.Module):
    config: T5Config
    has_relative_bias: bool
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, bias):
        return _BlockLayers(self.config, self.has_relative_bias, self.dtype, self.implementation,
                            name="layer")(x, mask, bias)


class _Blocks(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask):
        bias = None
        for index in range(self.config.num_layers):
            x, bias = _Block(self.config, index == 0, self.dtype, self.implementation,
                             name=str(index))(x, mask, bias)
        return x


class T5Stack(nn.Module):
    """The encoder's blocks and final layer norm (``encoder/...``)."""

    config: T5Config
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None):
        x = _Blocks(self.config, self.dtype, self.implementation, name="block")(x, mask)
        return T5LayerNorm(self.config.layer_norm_epsilon, self.dtype,
                           name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
    """See the module docstring: params ``{"shared", "encoder"}``."""

    config: T5Config
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, name="shared")(
            jnp.asarray(input_ids))
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask, bool)[:, None, None, :]
        return T5Stack(cfg, self.dtype, self.implementation, name="encoder")(x, mask)

    def init_params(self, key: jax.Array, length: int = 8) -> Any:
        return self.init(key, jnp.zeros((1, length), jnp.int32))["params"]
