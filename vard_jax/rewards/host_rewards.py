"""Non-differentiable rewards evaluated on the host (numpy in, numpy out).

These feed VARD's value stage only; they are never called inside jit or a gradient.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from vard_jax.rewards.registry import Reward, RewardContext, register
from vard_jax.rewards.shape_fidelity import shape_fidelity as _shape_fidelity

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: np.ndarray) -> np.ndarray:
    """Encoded JPEG size (quality 95, as in the DDPO paper) of each image, in kilobytes: [B]."""
    pixels = np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


@register("jpeg_compressibility", "minus the JPEG size in kB (non-differentiable)")
def jpeg_compressibility(context: RewardContext) -> Reward:
    del context
    return Reward(name="jpeg_compressibility",
                  score=lambda images, prompts: -jpeg_sizes_kb(images),
                  differentiable=False, jittable=False)


@register("jpeg_incompressibility", "the JPEG size in kB (non-differentiable)")
def jpeg_incompressibility(context: RewardContext) -> Reward:
    del context
    return Reward(name="jpeg_incompressibility",
                  score=lambda images, prompts: jpeg_sizes_kb(images),
                  differentiable=False, jittable=False)


@register("shape_fidelity", "shapes world: colour/shape/count/position match, in [0, 1]")
def shape_fidelity(context: RewardContext) -> Reward:
    del context

    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return _shape_fidelity(images, prompts)

    return Reward(name="shape_fidelity", score=score, differentiable=False, jittable=False)
