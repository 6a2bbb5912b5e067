"""Sample grids: images with their prompts (and rewards) written underneath, saved as PNG."""

from __future__ import annotations

import pathlib
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CELL = 128  # pixels of the longer image side in the grid
_TEXT_LINES = 4


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] floats in [0, 1] -> uint8."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, prompts: Sequence[str], scores: Optional[Sequence[float]] = None,
         columns: int = 8, score_name: str = "r", text_lines: int = _TEXT_LINES) -> Image.Image:
    """A PIL image: one cell per sample, its prompt (and score) in small text under it."""
    images = to_uint8(images)
    count, height, width, _ = images.shape
    scale = max(1, _CELL // max(height, width))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, cell_w // 6)
    text_h = 11 * text_lines + 4
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (cell_w + 4), rows * (cell_h + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        row, col = divmod(index, columns)
        x0, y0 = col * (cell_w + 4) + 2, row * (cell_h + text_h + 4) + 2
        tile = Image.fromarray(images[index]).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        caption = prompts[index] if index < len(prompts) else ""
        if scores is not None:
            caption = f"{score_name}={scores[index]:.3f} {caption}"
        lines = textwrap.wrap(caption, chars_per_line)[:text_lines]
        for k, line in enumerate(lines):
            draw.text((x0, y0 + cell_h + 2 + 11 * k), line, fill="black", font=font)
    return canvas


def save_grid(path: str | pathlib.Path, images: np.ndarray, prompts: Sequence[str],
              scores: Optional[Sequence[float]] = None, columns: int = 8,
              score_name: str = "r", text_lines: int = _TEXT_LINES) -> Image.Image:
    """Writes ``grid(...)`` to ``path`` (PNG; parent directories made) and returns it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = grid(images, prompts, scores, columns, score_name, text_lines)
    picture.save(path)
    return picture
