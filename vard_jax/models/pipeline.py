"""The thin interface every text-to-image model family implements.

A ``Pipeline`` holds the (stateless) modules and the tokenizer; parameters travel separately
as a dict ``{"unet": ..., "text_encoder": ..., "vae": ...}`` so that training code differentiates
and shards plain pytrees. The difference between pixel-space models (the shapes world) and
latent-space models (Stable Diffusion) lives here and nowhere else: ``sample_shape`` and
``decode``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion.schedule import ScheduleConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Modules of a text-to-image diffusion model (parameters are passed separately)."""

    unet: Any  # nn.unet.UNet2DConditionModel: apply(x [B,C,H,W], t [B], context [B,L,D]).sample
    text_encoder: Any  # nn.clip.CLIPTextModel
    tokenizer: Any  # vard_jax.tokenizer.CLIPTokenizer
    schedule: ScheduleConfig  # the training schedule (DDPM noise, or flow matching)
    sample_shape: tuple[int, int, int]  # [C, H, W] of the UNet's input (pixels or latents)
    vae: Optional[Any] = None  # nn.vae.AutoencoderKL for latent models, None for pixels
    vae_scaling_factor: float = 1.0  # latents = scaling * vae.encode(images)
    max_length: int = 77  # tokenizer length (padding to max_length)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def image_seq_len(self) -> Optional[int]:
        """Latent tokens of a transformer denoiser (a flow grid's dynamic shifting reads it);
        None for a UNet."""
        return None

    @property
    def context_shape(self) -> tuple[int, int]:
        """[L, D] of one prompt's context (what ``encode_ids`` returns per prompt)."""
        return (self.max_length, self.unet.config.cross_attention_dim)

    def unet_call(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
                  context: jax.Array) -> Any:
        """The UNet at x [B, C, H, W] with the context ``encode_ids`` made: its output
        (``.sample`` the prediction, ``.mid`` the mid-block features)."""
        return self.unet.apply({"params": unet_params}, x, timesteps, context)

    def eps_fn(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
               context: jax.Array) -> jax.Array:
        """The UNet's noise prediction for x [B, C, H, W], in float32 whatever its dtype."""
        return self.unet_call(unet_params, x, timesteps, context).sample.astype(jnp.float32)

    def mid_features(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
                     context: jax.Array) -> jax.Array:
        """The UNet's mid-block output [B, h, w, C] (NHWC) at x [B, C, H, W]."""
        return self.unet_call(unet_params, x, timesteps, context).mid

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids [B, max_length] int32, padded/truncated to ``max_length``."""
        return self.tokenizer.ids(list(prompts), self.max_length)

    def encode_ids(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
        """Text encoder hidden states [B, L, D] (the UNet's cross-attention context)."""
        return self.text_encoder.apply({"params": text_params}, input_ids).last_hidden_state

    def decode(self, params: dict, x0: jax.Array) -> jax.Array:
        """Final samples -> images [B, H, W, 3] in [0, 1] (VAE decode for latent models)."""
        if self.vae is not None:
            x0 = self.vae.apply({"params": params["vae"]}, x0 / self.vae_scaling_factor
                                + (self.vae.config.shift_factor or 0.0), method=self.vae.decode)
        images = jnp.transpose(x0, (0, 2, 3, 1)).astype(jnp.float32)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class SDXLPipeline(Pipeline):
    """Stable Diffusion XL: two text encoders, and the UNet's added conditioning.

    The context the rollout carries stays one array, [B, L + 1, D]: rows 0..L-1 hold the two
    encoders' penultimate hidden states side by side (D = D1 + D2, the UNet's cross-attention
    width); row L holds the second encoder's pooled, projected prompt embedding [P] and the six
    size/crop ids of SDXL's micro-conditioning (original size, crop corner, target size, in
    pixels), zero-padded to D. ``eps_fn`` splits it again. Classifier-free guidance, sharding
    and the value models handle it as they handle SD 1.x's context. Token ids are the two
    tokenizers' ids side by side, [B, 2L] (they pad differently).
    """

    text_encoder_2: Any = None  # nn.clip.CLIPTextModelWithProjection
    tokenizer_2: Any = None
    time_ids: tuple[int, ...] = (1024, 1024, 0, 0, 1024, 1024)

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.max_length + 1, self.unet.config.cross_attention_dim)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.concatenate([self.tokenizer.ids(list(prompts), self.max_length),
                               self.tokenizer_2.ids(list(prompts), self.max_length)], axis=1)

    def encode_ids(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
        length = self.max_length
        first = self.text_encoder.apply({"params": text_params["one"]}, input_ids[:, :length])
        second = self.text_encoder_2.apply({"params": text_params["two"]}, input_ids[:, length:])
        hidden = jnp.concatenate([first.penultimate, second.penultimate], axis=-1)
        time_ids = jnp.broadcast_to(jnp.asarray(self.time_ids, second.text_embeds.dtype),
                                    (input_ids.shape[0], len(self.time_ids)))
        extra = jnp.concatenate([second.text_embeds, time_ids], axis=-1)
        row = jnp.pad(extra, ((0, 0), (0, hidden.shape[-1] - extra.shape[-1])))
        return jnp.concatenate([hidden, row[:, None, :].astype(hidden.dtype)], axis=1)

    def split_context(self, context: jax.Array) -> tuple[jax.Array, dict]:
        """(hidden states [B, L, D], {"text_embeds": [B, P], "time_ids": [B, 6]})."""
        pooled = self.text_encoder_2.config.projection_dim
        row = context[:, -1].astype(jnp.float32)
        return context[:, :-1], {"text_embeds": row[:, :pooled],
                                 "time_ids": row[:, pooled:pooled + len(self.time_ids)]}

    def unet_call(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
                  context: jax.Array) -> Any:
        hidden, added = self.split_context(context)
        return self.unet.apply({"params": unet_params}, x, timesteps, hidden, added)


@dataclasses.dataclass(frozen=True, eq=False)
class MMDiTPipeline(Pipeline):
    """A flow-matching MMDiT (``unet`` holds the ``nn.mmdit.SD3Transformer2DModel``)
    conditioned on one CLIP text encoder with projection (the shapes world's flow model).

    The context the rollout carries is one array, [B, L + 1, D] (D = the transformer's
    ``joint_attention_dim``): the encoder's last hidden states, then one row with its pooled,
    projected embedding (the transformer's ``pooled_projections``), zero-padded to D. The
    model output is the velocity; ``schedule`` is a ``FlowMatchConfig``.
    """

    @property
    def image_seq_len(self) -> Optional[int]:
        patch = self.unet.config.patch_size
        return (self.sample_shape[1] // patch) * (self.sample_shape[2] // patch)

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.max_length + 1, self.unet.config.joint_attention_dim)

    def encode_ids(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
        out = self.text_encoder.apply({"params": text_params}, input_ids)
        return _with_pooled_row(out.last_hidden_state, out.text_embeds,
                                self.unet.config.joint_attention_dim)

    def unet_call(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
                  context: jax.Array) -> jax.Array:
        """The transformer's velocity at x [B, C, H, W] for the packed context."""
        pooled = context[:, -1, :self.unet.config.pooled_projection_dim]
        return self.unet.apply({"params": unet_params}, x, context[:, :-1], pooled, timesteps)

    def eps_fn(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
               context: jax.Array) -> jax.Array:
        """The velocity prediction, float32 (a flow model's output; the name is the
        interface's)."""
        return self.unet_call(unet_params, x, timesteps, context).astype(jnp.float32)

    def mid_features(self, unet_params: Any, x: jax.Array, timesteps: jax.Array,
                     context: jax.Array) -> jax.Array:
        raise ValueError("value.arch = 'unet_head' reads a UNet's mid block; an MMDiT flow "
                         "model has none (use value.arch = 'conv' or 'conv_x0')")


def _with_pooled_row(hidden: jax.Array, pooled: jax.Array, width: int) -> jax.Array:
    """[B, L, D'] hidden states and [B, P] pooled embeddings -> [B, L + 1, width], both
    zero-padded to ``width``."""
    hidden = jnp.pad(hidden, ((0, 0), (0, 0), (0, width - hidden.shape[-1])))
    row = jnp.pad(pooled, ((0, 0), (0, width - pooled.shape[-1]))).astype(hidden.dtype)
    return jnp.concatenate([hidden, row[:, None, :]], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class SD3Pipeline(MMDiTPipeline):
    """Stable Diffusion 3 / 3.5: the MMDiT flow model, three text encoders and a 16-channel
    VAE.

    The context is [B, L + L3 + 1, D]: rows 0..L-1 hold the two CLIP encoders' penultimate
    hidden states side by side, zero-padded to D; the next L3 rows the T5 encoder's last
    hidden states (``text_encoder_3``; without it, L3 = L rows of zeros, as diffusers does);
    the last row the two CLIPs' pooled, projected embeddings side by side. Token ids are the
    three tokenizers' ids side by side, [B, 2L + L3].
    """

    text_encoder_2: Any = None  # nn.clip.CLIPTextModelWithProjection (OpenCLIP bigG)
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # nn.t5.T5EncoderModel, or None (zero embeddings)
    tokenizer_3: Any = None
    t5_length: int = 256  # max_sequence_length of diffusers' SD3 pipeline

    @property
    def _t5_rows(self) -> int:
        return self.t5_length if self.text_encoder_3 is not None else self.max_length

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.max_length + self._t5_rows + 1, self.unet.config.joint_attention_dim)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        ids = [self.tokenizer.ids(prompts, self.max_length),
               self.tokenizer_2.ids(prompts, self.max_length)]
        if self.text_encoder_3 is not None:
            ids.append(self.tokenizer_3.ids(prompts, self.t5_length))
        return np.concatenate(ids, axis=1)

    def encode_ids(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
        length, width = self.max_length, self.unet.config.joint_attention_dim
        first = self.text_encoder.apply({"params": text_params["one"]}, input_ids[:, :length])
        second = self.text_encoder_2.apply({"params": text_params["two"]},
                                           input_ids[:, length:2 * length])
        clip = jnp.concatenate([first.penultimate, second.penultimate], axis=-1)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3.apply({"params": text_params["three"]},
                                           input_ids[:, 2 * length:]).astype(clip.dtype)
        else:
            t5 = jnp.zeros((input_ids.shape[0], length, width), clip.dtype)
        pooled = jnp.concatenate([first.text_embeds, second.text_embeds], axis=-1)
        return _with_pooled_row(jnp.concatenate([clip, t5], axis=1), pooled, width)
