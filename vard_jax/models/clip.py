"""CLIP image/text scoring in JAX, shared by every CLIP-based reward (PickScore, CLIP score,
the shapes world's tiny CLIP) and by the reward-initialised value network.

Image preprocessing (resize, centre crop, normalise) is done in JAX on [0, 1] NHWC images, so
the score is differentiable with respect to the pixels.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: jax.Array, size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> jax.Array:
    """[B, H, W, 3] images in [0, 1] -> [B, 3, size, size] CLIP pixel values.

    Resizes the shorter side to ``size`` (bicubic, antialiased), centre-crops, normalises.
    """
    batch, height, width, channels = images.shape
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        images = jax.image.resize(images, (batch, new_h, new_w, channels), "bicubic",
                                  antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[:, top:top + size, left:left + size]
    images = (images - jnp.asarray(mean)) / jnp.asarray(std)
    return jnp.transpose(images, (0, 3, 1, 2))


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def image_embeddings(clip_model: Any, params: Any, images: jax.Array,
                     size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> jax.Array:
    """Unit-norm image embeddings [B, D] of [0, 1] NHWC images.

    ``size`` (default: the vision tower's ``image_size``), ``mean`` and ``std`` are the
    preprocessing of the model's image processor.
    """
    size = size or clip_model.config.vision_config.image_size
    features = clip_model.apply({"params": params}, preprocess(images, size, mean, std),
                                method=clip_model.get_image_features)
    return _normalise(features)


def text_embeddings(clip_model: Any, params: Any, input_ids: jax.Array) -> jax.Array:
    """Unit-norm text embeddings [B, D] of token ids [B, L]."""
    return _normalise(clip_model.apply({"params": params}, input_ids,
                                       method=clip_model.get_text_features))


def clip_logits(clip_model: Any, params: Any, images: jax.Array, input_ids: jax.Array,
                size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD, scaled: bool = True) -> jax.Array:
    """Per-pair scores logit_scale * cos(image_i, text_i): [B] (PickScore's definition), or the
    cosine alone with ``scaled=False`` (HPS v2's).

    ``size``/``mean``/``std``: image preprocessing, as in ``image_embeddings``.
    """
    image = image_embeddings(clip_model, params, images, size, mean, std)
    text = text_embeddings(clip_model, params, input_ids)
    cosine = jnp.sum(image * text, axis=-1)
    return jnp.exp(params["logit_scale"]) * cosine if scaled else cosine
