"""Shape fidelity: a hand-written, non-differentiable reward for the shapes world.

``shape_fidelity(images, prompts)`` checks how well each image shows what its shapes-world
caption (``vard_jax.worlds.shapes``) describes. It is a plain numpy program:

1. Parse the prompt with ``parse_caption`` (a prompt outside the grammar raises ValueError).
2. Classify every pixel to the nearest palette colour in RGB (shape colours + background
   colours), which makes the program tolerant to moderate noise in generated images.
3. Background: the detected background is the most common label on the one-pixel border; the
   background term is 1 if it is the prompted background, else 0.
4. Colour: the fraction of shape-coloured pixels (labelled with any of ``shapes.COLORS``; the
   background palette never is) that carry the prompted colour (0 when there are none).
5. Objects: 8-connected components of the prompted colour with at least ``MIN_AREA`` pixels.
   * count term: 1 for the prompted count, 0.5 for one off, 0 for two or more off or when no
     component is found;
   * shape term: the fraction of components classified as the prompted shape (0 if none), by
     the nearest prototype in (fill ratio of the bounding box, top-half / bottom-half area):
     square (1.0, 1.0), circle (0.76, 1.0), triangle (0.5, 0.3);
   * position term (only when the prompt names a region): 1 if the bounding-box centre of the
     largest component lies nearest to the prompted region's anchor (``POSITION_ANCHORS``).
6. Score = 0.2 background + 0.3 colour + 0.25 count + 0.25 shape; when the prompt names a
   position, score = 0.85 * that + 0.15 position. Every term is in [0, 1], so is the score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vard_jax.worlds import shapes

WEIGHT_BACKGROUND: float = 0.2
WEIGHT_COLOR: float = 0.3
WEIGHT_COUNT: float = 0.25
WEIGHT_SHAPE: float = 0.25
#: Share of the score given to the position term when the prompt names a position.
WEIGHT_POSITION: float = 0.15
#: Components of the prompted colour smaller than this (pixels) are ignored as specks.
MIN_AREA: int = 12

_PALETTE_NAMES: tuple[str, ...] = (*shapes.COLORS, *shapes.BACKGROUNDS)
_PALETTE: np.ndarray = (
    np.asarray([*shapes.COLORS.values(), *shapes.BACKGROUNDS.values()], dtype=np.float32) / 255.0
)  # [P, 3]
_INDEX: dict[str, int] = {name: i for i, name in enumerate(_PALETTE_NAMES)}

#: (fill ratio, top/bottom area ratio) prototype of each shape, see ``classify_component``.
_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 1.0),
    "circle": (0.76, 1.0),
    "triangle": (0.5, 0.3),
}


def palette_labels(images: np.ndarray) -> np.ndarray:
    """Nearest palette colour of every pixel.

    Args:
        images: float [B, H, W, 3] in [0, 1] (clipped).

    Returns:
        int32 [B, H, W] indices into ``(*shapes.COLORS, *shapes.BACKGROUNDS)``.
    """
    pixels = np.clip(images.astype(np.float32), 0.0, 1.0)  # [B, H, W, 3]
    dist = np.sum((pixels[..., None, :] - _PALETTE) ** 2, axis=-1)  # [B, H, W, P]
    return np.argmin(dist, axis=-1).astype(np.int32)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a batch of masks.

    Args:
        mask: bool [B, H, W].

    Returns:
        int32 [B, H, W]: 0 off the mask; on the mask, 1 + the flat index (within its image) of
        the component's first pixel in row-major order, so equal labels <=> same component.
    """
    batch, height, width = mask.shape
    big = height * width + 1
    init = np.arange(1, height * width + 1, dtype=np.int32).reshape(1, height, width)  # [1, H, W]
    labels = np.where(mask, init, 0).astype(np.int32)  # [B, H, W]
    rows = np.arange(batch)[:, None, None]  # [B, 1, 1]
    while True:
        # Minimum label over the 3x3 neighbourhood (off-mask pixels count as +inf).
        padded = np.pad(np.where(mask, labels, big), ((0, 0), (1, 1), (1, 1)), constant_values=big)
        neighbourhood = np.min(
            np.stack(
                [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
            ),
            axis=0,
        )  # [B, H, W]
        updated = np.where(mask, neighbourhood, 0)
        # Pointer jumping: a label names a pixel of the same component; take that pixel's label.
        flat = updated.reshape(batch, -1)  # [B, H*W]
        jumped = flat[rows[:, :, 0], np.maximum(flat - 1, 0)].reshape(batch, height, width)
        updated = np.where(mask, np.minimum(updated, jumped), 0).astype(np.int32)
        if np.array_equal(updated, labels):
            return labels
        labels = updated


def classify_component(component: np.ndarray) -> str:
    """Shape name of one component, given as bool [h, w] cropped to its bounding box.

    Features: fill = area / (h * w) -- square ~1.0, circle ~0.76, triangle ~0.5 -- and the ratio
    of pixels in the top half of the rows to those in the bottom half (the middle row of an
    odd-height box excluded) -- ~0.3 for an apex-up triangle, ~1 for the symmetric shapes.
    """
    height = component.shape[0]
    area = float(component.sum())
    fill = area / component.size
    half = height // 2
    top = float(component[:half].sum())
    bottom = float(component[height - half :].sum())
    balance = top / bottom if bottom > 0 else 1.0
    balance = min(balance, 2.0)
    return min(
        _PROTOTYPES,
        key=lambda name: (fill - _PROTOTYPES[name][0]) ** 2 + (balance - _PROTOTYPES[name][1]) ** 2,
    )


def _check_images(images: np.ndarray, n_prompts: int) -> np.ndarray:
    images = np.asarray(images)
    expected = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, shapes.CHANNELS)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"images must be NHWC with shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.shape[0] != n_prompts:
        raise ValueError(f"got {images.shape[0]} images but {n_prompts} prompts")
    return images


def fidelity_terms(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every term of the score separately.

    Args:
        images: float [B, 32, 32, 3] in [0, 1] (NHWC); values outside are clipped.
        prompts: B shapes-world captions.

    Returns:
        float32 [B] arrays under "background", "color", "count", "shape", "position" (1 where
        the prompt names no position) and "score".
    """
    prompts = list(prompts)
    images = _check_images(images, len(prompts))
    specs = [shapes.parse_caption(p) for p in prompts]
    batch = len(specs)
    labels = palette_labels(images)  # [B, H, W]

    border = np.concatenate(
        [labels[:, 0, :], labels[:, -1, :], labels[:, 1:-1, 0], labels[:, 1:-1, -1]], axis=1
    )  # [B, 4*(S-1)]
    prompt_bg = np.asarray([_INDEX[s.background] for s in specs])  # [B]
    prompt_color = np.asarray([_INDEX[s.color] for s in specs])  # [B]
    detected_bg = np.asarray(
        [np.bincount(row, minlength=len(_PALETTE_NAMES)).argmax() for row in border]
    )  # [B]
    background = (detected_bg == prompt_bg).astype(np.float64)  # [B]

    foreground = labels < len(shapes.COLORS)  # [B, H, W], shape colours come first in the palette
    colored = labels == prompt_color[:, None, None]  # [B, H, W]
    n_foreground = foreground.sum(axis=(1, 2))  # [B]
    color = np.where(
        n_foreground > 0, (foreground & colored).sum(axis=(1, 2)) / np.maximum(n_foreground, 1), 0.0
    )  # [B]

    components = connected_components(colored)  # [B, H, W]
    count = np.zeros(batch)
    shape = np.zeros(batch)
    position = np.ones(batch)
    for b, spec in enumerate(specs):
        ids, areas = np.unique(components[b], return_counts=True)
        keep = (ids > 0) & (areas >= MIN_AREA)
        ids, areas = ids[keep], areas[keep]
        if len(ids) == 0:
            count[b] = 0.0
            shape[b] = 0.0
            position[b] = 0.0 if spec.position is not None else 1.0
            continue
        count[b] = max(0.0, 1.0 - abs(len(ids) - spec.count) / 2.0)
        matches = 0
        centres: list[tuple[float, float]] = []
        for component_id in ids:
            rows, cols = np.nonzero(components[b] == component_id)
            top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
            crop = components[b, top : bottom + 1, left : right + 1] == component_id  # [h, w]
            matches += classify_component(crop) == spec.shape
            centres.append(((top + bottom) / 2.0, (left + right) / 2.0))
        shape[b] = matches / len(ids)
        if spec.position is not None:
            row, col = centres[int(np.argmax(areas))]
            position[b] = float(shapes.region_of(row, col) == spec.position)

    base = (
        WEIGHT_BACKGROUND * background
        + WEIGHT_COLOR * color
        + WEIGHT_COUNT * count
        + WEIGHT_SHAPE * shape
    )  # [B]
    has_position = np.asarray([s.position is not None for s in specs])  # [B]
    with_position = (1.0 - WEIGHT_POSITION) * base + WEIGHT_POSITION * position  # [B]
    score = np.where(has_position, with_position, base)
    terms = {
        "background": background,
        "color": color,
        "count": count,
        "shape": shape,
        "position": position,
        "score": np.clip(score, 0.0, 1.0),
    }
    return {name: value.astype(np.float32) for name, value in terms.items()}


def shape_fidelity(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Fidelity of each image to its shapes-world prompt: float32 [B] in [0, 1].

    Args:
        images: float [B, 32, 32, 3] in [0, 1], NHWC.
        prompts: B captions in the shapes-world grammar.

    Raises:
        ValueError: wrong image shape/dtype, image/prompt count mismatch, or a prompt outside
            the grammar.
    """
    return fidelity_terms(images, prompts)["score"]
