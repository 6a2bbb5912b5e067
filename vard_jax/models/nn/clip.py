"""CLIP text and vision transformers (Radford et al., 2021) in Flax linen.

Configured from a transformers ``config.json`` (``CLIPConfig.from_dict`` for a whole CLIP, its
``text_config`` alone for a text encoder). Modules:

* ``CLIPTextModel``: the text tower; ``(input_ids [B, L]) -> TextOutput(last_hidden_state
  [B, L, D] after the final LayerNorm, pooled [B, D] at the end-of-text token, penultimate
  [B, L, D]: the second-to-last layer's output, which SDXL conditions on)``.
* ``CLIPTextModelWithProjection``: the same plus ``text_embeds = pooled @ text_projection``
  (SDXL's second encoder).
* ``CLIPModel``: both towers, projections and ``logit_scale``; ``get_text_features`` and
  ``get_image_features`` (pixels NCHW, already normalised) as in transformers.

The causal mask is always applied to text; an optional ``attention_mask`` [B, L] (1 = token)
masks padding. Parameter names mirror the public checkpoints (``text_model/encoder/layers/0/
self_attn/q_proj``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vard_jax.models.nn import attention as attention_lib

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _fields(cls, config: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names and v is not None}


class _TowerConfig:
    """``from_dict`` (known fields of a transformers config, checked) and ``to_dict``."""

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "CLIP config"):
        made = cls(**_fields(cls, config))
        made.validate(source)
        return made

    def validate(self, source: str) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {self.hidden_act!r} is not supported "
                             f"({', '.join(ACTIVATIONS)})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.image_size % self.patch_size:
            raise ValueError(f"{source}: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "CLIP config") -> "CLIPConfig":
        return cls(CLIPTextConfig.from_dict(config.get("text_config") or {}, source),
                   CLIPVisionConfig.from_dict(config.get("vision_config") or {}, source),
                   int(config.get("projection_dim", 512)),
                   float(config.get("logit_scale_init_value", 2.6592)))

    def to_dict(self) -> dict:
        return {"text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict(),
                "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value,
                "model_type": "clip", "architectures": ["CLIPModel"]}


class _SelfAttention(nn.Module):
    heads: int
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, is_causal):
        features = x.shape[-1]
        q, k, v = (attention_lib.split_heads(nn.Dense(features, dtype=self.dtype, name=name)(x),
                                             self.heads)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = attention_lib.attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=self.implementation)
        return nn.Dense(features, dtype=self.dtype, name="out_proj")(
            attention_lib.merge_heads(out))


class _MLP(nn.Module):
    intermediate: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.act](h))


class _EncoderLayer(nn.Module):
    heads: int
    intermediate: int
    act: str
    eps: float
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, is_causal):
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + _SelfAttention(self.heads, self.dtype, self.implementation, name="self_attn")(
            h, mask, is_causal)
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + _MLP(self.intermediate, self.act, self.dtype, name="mlp")(h)


class _Layers(nn.Module):
    count: int
    heads: int
    intermediate: int
    act: str
    eps: float
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask, is_causal):
        """The final output and the input of the last layer (the penultimate hidden state)."""
        previous = x
        for index in range(self.count):
            previous = x
            x = _EncoderLayer(self.heads, self.intermediate, self.act, self.eps, self.dtype,
                              self.implementation, name=str(index))(x, mask, is_causal)
        return x, previous


class _Encoder(nn.Module):
    config: Any  # CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        cfg = self.config
        return _Layers(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                       cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.implementation,
                       name="layers")(x, mask, is_causal)


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D]
    pooled: jax.Array  # [B, D]
    penultimate: jax.Array  # [B, L, D]


class _TextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                          name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> TextOutput:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        x = _TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask, bool)[:, None, None, :]
        x, penultimate = _Encoder(cfg, self.dtype, self.implementation, name="encoder")(
            x, mask, is_causal=True)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                         name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:  # checkpoints from before the token was configurable
            end = jnp.argmax(input_ids, axis=-1)
        else:
            end = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
        return TextOutput(x, pooled, penultimate)


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, pixel_values) -> tuple[jax.Array, jax.Array]:
        """[B, C, H, W] normalised pixels -> (last_hidden_state [B, 1 + P, D], pooled [B, D])."""
        cfg = self.config
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        x = _PatchEmbeddings(cfg, self.dtype, name="embeddings")(x)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x, _ = _Encoder(cfg, self.dtype, self.implementation, name="encoder")(x)
        pooled = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                              name="post_layernorm")(x[:, 0])
        return x, pooled


class _PatchEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        patch = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (patch, patch), strides=(patch, patch), padding="VALID",
                    use_bias=False, dtype=self.dtype, name="patch_embedding")(x)
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1])),
                             x], axis=1)
        positions = nn.Embed((cfg.image_size // patch) ** 2 + 1, cfg.hidden_size,
                             dtype=self.dtype, name="position_embedding")(
            jnp.arange(x.shape[1]))
        return x + positions[None]


class CLIPTextModel(nn.Module):
    """The text tower alone (Stable Diffusion's text encoder): params ``{"text_model"}``."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> TextOutput:
        return CLIPTextTransformer(self.config, self.dtype, self.implementation,
                                   name="text_model")(input_ids, attention_mask)

    def init_params(self, key: jax.Array, length: Optional[int] = None) -> Any:
        ids = jnp.zeros((1, length or self.config.max_position_embeddings), jnp.int32)
        return self.init(key, ids)["params"]


class ProjectedTextOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooled: jax.Array
    penultimate: jax.Array
    text_embeds: jax.Array  # [B, P]


class CLIPTextModelWithProjection(nn.Module):
    """The text tower and its projection (SDXL's second text encoder)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> ProjectedTextOutput:
        out = CLIPTextTransformer(self.config, self.dtype, self.implementation,
                                  name="text_model")(input_ids, attention_mask)
        embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                          name="text_projection")(out.pooled)
        return ProjectedTextOutput(*out, embeds)

    def init_params(self, key: jax.Array, length: Optional[int] = None) -> Any:
        ids = jnp.zeros((1, length or self.config.max_position_embeddings), jnp.int32)
        return self.init(key, ids)["params"]


class CLIPModel(nn.Module):
    """Both towers with their projections and the learned ``logit_scale`` (log of it)."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    implementation: str = "xla"

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text_config, self.dtype, self.implementation)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype,
                                                  self.implementation)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", lambda _: jnp.asarray(cfg.logit_scale_init_value, jnp.float32))

    def get_text_features(self, input_ids, attention_mask=None) -> jax.Array:
        """Projected (not normalised) text embeddings [B, P]."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

    def get_image_features(self, pixel_values) -> jax.Array:
        """Projected (not normalised) image embeddings [B, P] of normalised NCHW pixels."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def __call__(self, input_ids, pixel_values):
        return (self.get_text_features(input_ids), self.get_image_features(pixel_values),
                self.logit_scale)

    def init_params(self, key: jax.Array) -> Any:
        text, vision = self.config.text_config, self.config.vision_config
        ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
        pixels = jnp.zeros((1, vision.num_channels, vision.image_size, vision.image_size))
        return self.init(key, ids, pixels)["params"]
