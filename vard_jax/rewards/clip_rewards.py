"""CLIP-based rewards (differentiable, jittable) of the shapes world.

* ``clip_alignment``: ``logit_scale * cos(image, text)`` through ``vard_jax.models.clip``, the
  function PickScore defines.
* ``caption_choice``: the log-probability that the same CLIP picks the prompt among every
  caption one attribute away from it (``vard_jax.worlds.negatives.all_variants``), from the
  same embeddings. It is at most 0, near 0 once the image shows the prompt rather than a near
  miss (real images: -0.7 training, -1.4 held-out), and far below for images that show
  something else or nothing (flat or dark canvases about -16), whatever their absolute CLIP
  score. As a training reward of the shipped base model it gives little signal: its samples
  score about -21 (docs/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.models import clip as clip_lib
from vard_jax.rewards.registry import Reward, RewardContext, register
from vard_jax.worlds import negatives
from vard_jax.worlds import shapes as world


def clip_reward(name: str, clip_model, clip_params, tokenizer, max_length: int,
                image_size: Optional[int] = None, mean: Sequence[float] = clip_lib.CLIP_MEAN,
                std: Sequence[float] = clip_lib.CLIP_STD, scaled: bool = True) -> Reward:
    """A Reward scoring images against their prompts with a Flax CLIP model.

    ``image_size`` (default: the vision tower's), ``mean`` and ``std`` are the image
    processor's preprocessing; ``scaled``: logit_scale * cos, else the cosine.
    """
    def prepare(prompts):
        return tokenizer.ids(list(prompts), max_length)

    def score_with(params, images, input_ids):
        return clip_lib.clip_logits(clip_model, params, images, input_ids, image_size, mean, std,
                                    scaled)

    return Reward(name=name, score=lambda images, ids: score_with(clip_params, images, ids),
                  differentiable=True, jittable=True, prepare=prepare,
                  backbone=(clip_model, clip_params, score_with))


@functools.lru_cache(maxsize=4)
def _world_clip(path: str):
    from vard_jax.models import shapes as shapes_model

    pipeline, _, clip_model, _ = shapes_model.load(path)
    return clip_model, shapes_model.load_reward(path, clip_model), pipeline.tokenizer


@register("clip_alignment", "shapes world: the tiny CLIP's image-text score (differentiable)")
def clip_alignment(context: RewardContext) -> Reward:
    clip_model, clip_params, tokenizer = context.world_clip or _world_clip(context.path)
    return clip_reward("clip_alignment", clip_model, clip_params, tokenizer,
                       int(clip_model.config.text_config.max_position_embeddings))


def caption_choice_reward(name: str, clip_model, clip_params, tokenizer,
                          max_length: int) -> Reward:
    """log p(prompt | image) among the prompt and its one-attribute variants (padded to
    ``negatives.MAX_VARIANTS``; the padding is masked out)."""
    choices = 1 + negatives.MAX_VARIANTS
    pad = int(tokenizer.pad_token_id)

    def prepare(prompts):
        # [B, choices, L]: the prompt, its variants, then rows of padding only (masked out).
        ids = np.full((len(prompts), choices, max_length), pad, np.int32)
        for row, prompt in enumerate(prompts):
            spec = world.parse_caption(prompt)  # one-line ValueError outside the grammar
            captions = [prompt] + [world.caption_of(v) for v in negatives.all_variants(spec)]
            ids[row, :len(captions)] = tokenizer.ids(captions, max_length)
        return ids

    def score_with(params, images, ids):
        valid = ids[:, :, 0] != pad  # a caption starts with the begin token, padding does not
        batch, count, length = ids.shape
        image = clip_lib.image_embeddings(clip_model, params, images)  # [B, D]
        text = clip_lib.text_embeddings(clip_model, params, ids.reshape(batch * count, length))
        logits = jnp.exp(params["logit_scale"]) * jnp.einsum(
            "bd,bnd->bn", image, text.reshape(batch, count, -1))
        logits = jnp.where(valid, logits, -jnp.inf)
        return logits[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    return Reward(name=name, score=lambda images, prepared: score_with(clip_params, images,
                                                                       prepared),
                  differentiable=True, jittable=True, prepare=prepare,
                  backbone=(clip_model, clip_params, score_with))


@register("caption_choice", "shapes world: log-probability that the reward CLIP picks the "
          "prompt among every caption one attribute away (differentiable, <= 0)")
def caption_choice(context: RewardContext) -> Reward:
    clip_model, clip_params, tokenizer = context.world_clip or _world_clip(context.path)
    return caption_choice_reward("caption_choice", clip_model, clip_params, tokenizer,
                                 int(clip_model.config.text_config.max_position_embeddings))
