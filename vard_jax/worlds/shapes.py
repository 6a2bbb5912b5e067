"""The "shapes world": a tiny procedural captioned image data set.

Every image is 32x32 RGB (NHWC float32 in [0, 1]) and shows one to three shapes of ONE kind and
ONE colour on a uniformly coloured background, rendered crisply (no anti-aliasing) with numpy.
Its caption follows a fixed lower-case grammar::

    caption    := COUNT COLOR SHAPE[s] [POSITION] "on a" BACKGROUND "background"
    COUNT      := "a" | "two" | "three"          (plural "s" exactly when COUNT != "a")
    POSITION   := "at the top left" | "at the top right" | "at the bottom left"
                | "at the bottom right" | "in the center"      (only when COUNT == "a")

e.g. ``"two red circles on a blue background"`` is not possible (blue is a shape colour, not a
background), but ``"two red circles on a navy background"`` and
``"a green triangle at the top left on a black background"`` are.

Shapes of an image never overlap or touch (at least ``GAP`` = 2 pixels between their bounding
boxes) and keep a one-pixel margin from the canvas edge, so they are countable as connected
components. A shape of size ``s`` (4..7) occupies a ``(2s+1) x (2s+1)`` bounding box:

* square:   the whole box                     (fill ratio 1.0)
* circle:   pixels within ``s + 0.3`` of the centre   (fill ratio 0.72..0.79)
* triangle: isosceles, apex up, base on the bottom row  (fill ratio ~0.51)

Held-out split (compositional generalisation): the (colour, shape) pairs in ``HELDOUT_PAIRS`` --
red triangle, green circle, blue square, cyan triangle -- never occur in the ``"train"`` split;
the ``"heldout"`` split consists of exactly those pairs (with every count, position and
background). Every colour and every shape still occurs in training, only those combinations
are new.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

import numpy as np

IMAGE_SIZE: int = 32
CHANNELS: int = 3

#: Shape colours: saturated and pairwise far apart in RGB (min distance ~125).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (160, 40, 200),
    "cyan": (30, 210, 220),
}

#: Background colours: neutral, pastel and dark; each is far from every shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (235, 225, 185),
    "navy": (20, 25, 85),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Count -> the caption word for it.
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

#: Named regions for single-shape captions, and the phrase each one adds to a caption.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
    "center": "in the center",
}

#: (colour, shape) pairs that the train split never contains; the held-out split is exactly these.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("cyan", "triangle")}
)

SPLITS: tuple[str, ...] = ("train", "heldout")
Split = Literal["train", "heldout"]

#: Shape size (half-side / radius in pixels) range, inclusive, by count.
SIZE_RANGE: dict[int, tuple[int, int]] = {1: (5, 7), 2: (4, 7), 3: (4, 6)}
#: Minimum number of background pixels between the bounding boxes of two shapes.
GAP: int = 2
#: Minimum number of background pixels between a shape and the canvas edge.
MARGIN: int = 1

# Bounding-box centre (row, col) ranges used to render a single shape in a named region. Corner
# centres lie in [s + MARGIN, _CORNER_INNER] (mirrored for bottom / right); centre in _CENTER_RANGE.
_CORNER_INNER: int = 11
_CENTER_RANGE: tuple[int, int] = (14, 17)

#: Anchor (row, col) of each region; a bounding-box centre belongs to the nearest anchor.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (9.5, 9.5),
    "top right": (9.5, 21.5),
    "bottom left": (21.5, 9.5),
    "bottom right": (21.5, 21.5),
    "center": (15.5, 15.5),
}


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What one image shows; the caption is a function of it (see ``caption_of``).

    Attributes:
        count: number of shapes, 1..3.
        shape: one of ``SHAPES``.
        color: shape colour, a key of ``COLORS``.
        background: background colour, a key of ``BACKGROUNDS``.
        position: a key of ``POSITION_PHRASES`` (only allowed when ``count == 1``) or None for
            an unconstrained placement.
    """

    count: int
    shape: str
    color: str
    background: str
    position: str | None = None

    def __post_init__(self) -> None:
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be one of {sorted(COUNT_WORDS)}, got {self.count!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}"
            )
        if self.position is not None:
            if self.position not in POSITION_PHRASES:
                raise ValueError(
                    f"position must be one of {POSITIONS} or None, got {self.position!r}"
                )
            if self.count != 1:
                raise ValueError("a position can only be given for a single shape (count == 1)")

    @property
    def split(self) -> Split:
        """``"heldout"`` if the (colour, shape) pair is held out, else ``"train"``."""
        return "heldout" if (self.color, self.shape) in HELDOUT_PAIRS else "train"


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def caption_of(spec: SceneSpec) -> str:
    """The caption of a scene, e.g. ``"a green triangle at the top left on a black background"``."""
    noun = spec.shape if spec.count == 1 else spec.shape + "s"
    words = [COUNT_WORDS[spec.count], spec.color, noun]
    if spec.position is not None:
        words.append(POSITION_PHRASES[spec.position])
    words += ["on a", spec.background, "background"]
    return " ".join(words)


def _alternation(options: Sequence[str]) -> str:
    # Longest first so that no option is shadowed by a prefix of another.
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"^(?P<count>{_alternation(list(COUNT_WORDS.values()))}) "
    rf"(?P<color>{_alternation(list(COLORS))}) "
    rf"(?P<shape>{_alternation(list(SHAPES))})(?P<plural>s?)"
    rf"(?: (?P<position>{_alternation(list(POSITION_PHRASES.values()))}))?"
    rf" on a (?P<background>{_alternation(list(BACKGROUNDS))}) background$"
)
_COUNT_OF_WORD: dict[str, int] = {word: count for count, word in COUNT_WORDS.items()}
_POSITION_OF_PHRASE: dict[str, str] = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> SceneSpec:
    """Inverse of ``caption_of``: the scene a caption describes.

    Case and runs of whitespace are normalised; anything else outside the grammar (unknown
    words, wrong plural, a position phrase with several shapes) raises ``ValueError``.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(
            f"caption {caption!r} is outside the shapes-world grammar "
            "'<a|two|three> <colour> <shape>[s] [<position phrase>] on a <background> background' "
            f"(colours {tuple(COLORS)}, shapes {SHAPES}, backgrounds {tuple(BACKGROUNDS)})"
        )
    count = _COUNT_OF_WORD[match["count"]]
    plural = match["plural"] == "s"
    if plural != (count > 1):
        raise ValueError(
            f"caption {caption!r}: the shape noun must be {'plural' if count > 1 else 'singular'} "
            f"after {match['count']!r}"
        )
    phrase = match["position"]
    if phrase is not None and count != 1:
        raise ValueError(
            f"caption {caption!r}: a position phrase is only allowed for a single shape"
        )
    return SceneSpec(
        count=count,
        shape=match["shape"],
        color=match["color"],
        background=match["background"],
        position=None if phrase is None else _POSITION_OF_PHRASE[phrase],
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def pairs(split: Split) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a split, in ``COLORS`` x ``SHAPES`` order."""
    _check_split(split)
    held = split == "heldout"
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == held]


def all_specs(split: Split) -> list[SceneSpec]:
    """Every distinct scene of a split (deterministic order: pair, count, position, background)."""
    specs: list[SceneSpec] = []
    for color, shape in pairs(split):
        for count in COUNT_WORDS:
            positions: tuple[str | None, ...] = (None, *POSITIONS) if count == 1 else (None,)
            for position in positions:
                for background in BACKGROUNDS:
                    specs.append(SceneSpec(count, shape, color, background, position))
    return specs


def all_prompts(split: Split) -> list[str]:
    """Every caption of a split, position phrases included (train: 560, heldout: 160)."""
    return [caption_of(spec) for spec in all_specs(split)]


def prompts(split: Split) -> list[str]:
    """The evaluation prompt list of a split: every caption without a position phrase.

    One caption per (colour, shape, count, background) of the split (train: 210, heldout: 60),
    in the deterministic order of ``all_prompts``.
    """
    return [caption_of(spec) for spec in all_specs(split) if spec.position is None]


def words() -> list[str]:
    """Sorted list of every word the caption grammar can produce (the tokenizer's word list)."""
    vocab: set[str] = set()
    for split in SPLITS:
        for caption in all_prompts(split):  # type: ignore[arg-type]
            vocab.update(caption.split())
    return sorted(vocab)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask [2*size+1, 2*size+1] of a shape whose bounding box is the whole mask."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    side = 2 * size + 1
    offsets = np.arange(side) - size  # [side], -size..size
    dy = offsets[:, None]  # [side, 1]
    dx = offsets[None, :]  # [1, side]
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return dy**2 + dx**2 <= (size + 0.3) ** 2
    # Triangle, apex up: row r (0 = top) spans 2 * (r // 2) + 1 pixels centred on the middle.
    rows = np.arange(side)[:, None]  # [side, 1]
    return np.abs(dx) <= rows // 2


def region_of(row: float, col: float) -> str:
    """The named region (key of ``POSITION_ANCHORS``) nearest to a bounding-box centre."""
    def squared_distance(name: str) -> float:
        anchor_row, anchor_col = POSITION_ANCHORS[name]
        return (row - anchor_row) ** 2 + (col - anchor_col) ** 2

    return min(POSITION_ANCHORS, key=squared_distance)


def _region_centre(position: str, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random bounding-box centre (row, col) for a shape of ``size`` inside a named region."""
    if position == "center":
        lo, hi = _CENTER_RANGE
        return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    # Distances of the centre from the region's own corner of the canvas.
    near_row, near_col = (int(v) for v in rng.integers(size + MARGIN, _CORNER_INNER + 1, size=2))
    vertical, horizontal = position.split(" ")
    row = near_row if vertical == "top" else IMAGE_SIZE - 1 - near_row
    col = near_col if horizontal == "left" else IMAGE_SIZE - 1 - near_col
    return row, col


def _place(
    sizes: Sequence[int], rng: np.random.Generator, attempts: int = 200
) -> list[tuple[int, int]] | None:
    """Random non-touching bounding-box centres (row, col) for shapes of ``sizes``, or None."""
    for _ in range(attempts):
        centres: list[tuple[int, int]] = []
        for size in sizes:
            lo, hi = size + MARGIN, IMAGE_SIZE - 1 - MARGIN - size
            row, col = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            clear = all(
                abs(row - r) >= size + s + GAP + 1 or abs(col - c) >= size + s + GAP + 1
                for (r, c), s in zip(centres, sizes)
            )
            if not clear:
                break
            centres.append((row, col))
        if len(centres) == len(sizes):
            return centres
    return None


def render(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """Render a scene: float32 [IMAGE_SIZE, IMAGE_SIZE, CHANNELS] in [0, 1].

    Sizes (per shape) and placements are drawn from ``rng``; a named position puts the single
    shape's bounding-box centre in that region (see ``POSITION_ANCHORS``).
    """
    lo, hi = SIZE_RANGE[spec.count]
    sizes = [int(s) for s in rng.integers(lo, hi + 1, size=spec.count)]
    if spec.position is not None:
        centres = [_region_centre(spec.position, sizes[0], rng)]
    else:
        placed = _place(sizes, rng)
        while placed is None:  # crowded draw: shrink the largest shape and retry
            largest = int(np.argmax(sizes))
            if sizes[largest] == lo:
                raise RuntimeError(
                    f"could not place {spec.count} shapes of size {lo} without contact"
                )
            sizes[largest] -= 1
            placed = _place(sizes, rng)
        centres = placed

    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)  # [H, W, 3]
    image[...] = BACKGROUNDS[spec.background]
    color = np.asarray(COLORS[spec.color], dtype=np.uint8)
    for (row, col), size in zip(centres, sizes):
        mask = shape_mask(spec.shape, size)  # [2s+1, 2s+1]
        window = image[row - size : row + size + 1, col - size : col + size + 1]  # [2s+1, 2s+1, 3]
        window[mask] = color
    return image.astype(np.float32) / 255.0


def sample_specs(n: int, rng: np.random.Generator, split: Split = "train") -> list[SceneSpec]:
    """``n`` random scenes of a split.

    (colour, shape) pair, count and background are uniform; a single shape gets a named position
    with probability 1/2 (uniform over ``POSITIONS``), otherwise none.
    """
    _check_split(split)
    split_pairs = pairs(split)
    colors_shapes = rng.integers(len(split_pairs), size=n)
    counts = rng.integers(1, len(COUNT_WORDS) + 1, size=n)
    backgrounds = rng.integers(len(BACKGROUNDS), size=n)
    named = rng.random(n) < 0.5
    regions = rng.integers(len(POSITIONS), size=n)
    background_names = list(BACKGROUNDS)
    specs = []
    for i in range(n):
        color, shape = split_pairs[int(colors_shapes[i])]
        count = int(counts[i])
        position = POSITIONS[int(regions[i])] if count == 1 and named[i] else None
        background = background_names[int(backgrounds[i])]
        specs.append(SceneSpec(count, shape, color, background, position))
    return specs


def generate(n: int, seed: int, split: Split = "train") -> tuple[np.ndarray, list[str]]:
    """``n`` captioned images of a split, deterministic for ``seed``.

    Returns:
        images: float32 [n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS] in [0, 1] (NHWC).
        captions: the ``n`` captions, ``captions[i]`` describing ``images[i]``.
    """
    rng = np.random.default_rng(seed)
    specs = sample_specs(n, rng, split)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.float32)  # [n, H, W, 3]
    for i, spec in enumerate(specs):
        images[i] = render(spec, rng)
    return images, [caption_of(spec) for spec in specs]
