"""CLIP-based rewards (differentiable, jittable): the shapes world's ``clip_alignment``.

Every CLIP-family reward scores ``logit_scale * cos(image, text)`` through
``vard_jax.models.clip``, the function PickScore defines.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from vard_jax.models import clip as clip_lib
from vard_jax.rewards.registry import Reward, RewardContext, register


def clip_reward(name: str, clip_model, clip_params, tokenizer, max_length: int,
                image_size: Optional[int] = None, mean: Sequence[float] = clip_lib.CLIP_MEAN,
                std: Sequence[float] = clip_lib.CLIP_STD) -> Reward:
    """A Reward scoring images against their prompts with a Flax CLIP model.

    ``image_size`` (default: the vision tower's), ``mean`` and ``std`` are the image
    processor's preprocessing.
    """
    def prepare(prompts):
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="np").input_ids
        return ids.astype(np.int32)

    def score_with(params, images, input_ids):
        return clip_lib.clip_logits(clip_model, params, images, input_ids, image_size, mean, std)

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
