"""Negatives of the shapes world, for reward models that are hard to game.

A reward model trained only on (image, caption) pairs of the world ranks captions for images it
has seen; a policy fine-tuned against it moves its samples to where the reward was never
trained, and finds images that score high without showing the prompt (the classic example:
large dark blobs in any colour). Three kinds of negatives close those holes:

* **Hard negatives**: the same scene with exactly one attribute changed (colour, shape, count,
  position or background); rendered, they are wrong images for the caption, captioned, wrong
  captions for the image. Only the training split's (colour, shape) pairs are used, so the
  held-out combinations stay unseen.
* **Corrupted renderings** of a caption's own scene, wrong for it in the ways fine-tuning
  games a reward: shapes darkened or greyed, grown into blobs, or recoloured halfway to
  another palette colour.
* **Off-distribution images** that match no caption: flat fields, large blobs (shapes far
  larger than the world draws, in dark or random colours), darkened scenes, smooth noise,
  and scenes with smeared edges and speckle.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vard_jax.worlds import shapes as world

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "position", "background")
OFF_DISTRIBUTION_KINDS: tuple[str, ...] = ("flat", "blob", "dark", "noise", "smeared")


def attribute_variant(spec: world.SceneSpec, attribute: str,
                      rng: np.random.Generator) -> world.SceneSpec | None:
    """``spec`` with ``attribute`` changed to another valid value of the training split, or
    None when the attribute cannot change (a position of an unplaced or multiple shape)."""
    train_pairs = set(world.pairs("train"))
    if attribute == "color":
        options = [c for c in world.COLORS if c != spec.color and (c, spec.shape) in train_pairs]
        return dataclasses.replace(spec, color=str(rng.choice(options))) if options else None
    if attribute == "shape":
        options = [s for s in world.SHAPES if s != spec.shape and (spec.color, s) in train_pairs]
        return dataclasses.replace(spec, shape=str(rng.choice(options))) if options else None
    if attribute == "count":
        count = int(rng.choice([c for c in world.COUNT_WORDS if c != spec.count]))
        return dataclasses.replace(spec, count=count,
                                   position=spec.position if count == 1 else None)
    if attribute == "position":
        if spec.position is None:
            return None
        options = [p for p in world.POSITIONS if p != spec.position]
        return dataclasses.replace(spec, position=str(rng.choice(options)))
    if attribute == "background":
        options = [b for b in world.BACKGROUNDS if b != spec.background]
        return dataclasses.replace(spec, background=str(rng.choice(options)))
    raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")


def all_variants(spec: world.SceneSpec) -> list[world.SceneSpec]:
    """Every scene one attribute away from ``spec`` (any split), in a fixed order: other
    colours, shapes, counts (a single shape's position dropped), positions (a placed single
    shape only) and backgrounds. At most ``MAX_VARIANTS``."""
    out = [dataclasses.replace(spec, color=c) for c in world.COLORS if c != spec.color]
    out += [dataclasses.replace(spec, shape=s) for s in world.SHAPES if s != spec.shape]
    out += [dataclasses.replace(spec, count=c, position=None) for c in world.COUNT_WORDS
            if c != spec.count]
    if spec.position is not None:
        out += [dataclasses.replace(spec, position=p) for p in world.POSITIONS
                if p != spec.position]
    out += [dataclasses.replace(spec, background=b) for b in world.BACKGROUNDS
            if b != spec.background]
    return out


#: The most scenes one attribute away from any scene (a placed single shape).
MAX_VARIANTS: int = (len(world.COLORS) - 1 + len(world.SHAPES) - 1 + len(world.COUNT_WORDS) - 1
                     + len(world.POSITIONS) - 1 + len(world.BACKGROUNDS) - 1)


def hard_negatives(spec: world.SceneSpec, k: int,
                   rng: np.random.Generator) -> list[world.SceneSpec]:
    """``k`` scenes that differ from ``spec`` in one attribute each, attributes drawn without
    replacement among those that can change (then the same order again when k is larger)."""
    variants: list[world.SceneSpec] = []
    order = list(rng.permutation(ATTRIBUTES))
    while len(variants) < k:
        changed = False
        for attribute in order:
            variant = attribute_variant(spec, str(attribute), rng)
            if variant is not None:
                variants.append(variant)
                changed = True
                if len(variants) == k:
                    break
        if not changed:  # cannot happen in this world: colour and background always change
            raise ValueError(f"no attribute of {spec} can change")
    return variants


CORRUPTIONS: tuple[str, ...] = ("darkened", "greyed", "grown", "recoloured")


def corrupted(spec: world.SceneSpec, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A rendering of ``spec`` that is wrong for its caption in the ways fine-tuning games a
    reward: shapes darkened or greyed out of their colour, grown into blobs (dilated by 2-4
    pixels), or in a colour between two palette colours. [H, W, 3] in [0, 1]."""
    image = world.render(spec, rng)
    background = np.asarray(world.BACKGROUNDS[spec.background], np.float32) / 255.0
    shape = np.any(np.abs(image - background) > 1e-6, axis=-1)  # [H, W]
    colour = np.asarray(world.COLORS[spec.color], np.float32) / 255.0
    if kind == "darkened":
        image[shape] = colour * rng.uniform(0.1, 0.45)
    elif kind == "greyed":
        mix = rng.uniform(0.5, 0.9)
        image[shape] = (1 - mix) * colour + mix * colour.mean()
    elif kind == "grown":
        grown = shape.copy()
        for _ in range(int(rng.integers(2, 5))):
            grown[1:] |= grown[:-1].copy()
            grown[:-1] |= grown[1:].copy()
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
        image[grown] = colour
    elif kind == "recoloured":
        others = [c for c in world.COLORS if c != spec.color]
        other = np.asarray(world.COLORS[str(rng.choice(others))], np.float32) / 255.0
        image[shape] = 0.5 * (colour + other)
    else:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    return image


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A random colour field [H, W, 3] in [0, 1], bilinear-ish (nearest then box) from a
    ``cells`` x ``cells`` grid."""
    size = world.IMAGE_SIZE
    coarse = rng.random((cells, cells, world.CHANNELS))
    field = np.repeat(np.repeat(coarse, -(-size // cells), 0), -(-size // cells), 1)[:size, :size]
    return _box_blur(field, 3)


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = np.zeros_like(image)
    size = world.IMAGE_SIZE
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += padded[dy:dy + size, dx:dx + size]
    return out / (2 * radius + 1) ** 2


def _dark_or_random_colour(rng: np.random.Generator) -> np.ndarray:
    colour = rng.random(3)
    return colour * rng.uniform(0.05, 0.4) if rng.random() < 0.5 else colour


def off_distribution_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] of ``kind`` (one of ``OFF_DISTRIBUTION_KINDS``)."""
    size = world.IMAGE_SIZE
    if kind == "flat":
        return np.broadcast_to(_dark_or_random_colour(rng), (size, size, 3)).astype(np.float32)
    if kind == "blob":  # 1-3 ellipses far larger than the world's shapes (radius <= 7.3)
        backgrounds = list(world.BACKGROUNDS.values())
        image = (np.asarray(backgrounds[rng.integers(len(backgrounds))], np.float32) / 255.0
                 if rng.random() < 0.7 else rng.random(3).astype(np.float32))
        image = np.broadcast_to(image, (size, size, 3)).copy()
        rows, cols = np.mgrid[0:size, 0:size]
        for _ in range(int(rng.integers(1, 4))):
            ry, rx = rng.uniform(8, 15, size=2)
            cy, cx = rng.uniform(4, size - 4, size=2)
            inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
            image[inside] = _dark_or_random_colour(rng)
        return np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)
    if kind == "dark":  # a real scene, darkened
        spec = world.sample_specs(1, rng)[0]
        return (world.render(spec, rng) * rng.uniform(0.05, 0.35)).astype(np.float32)
    if kind == "noise":
        return np.clip(_smooth_field(rng, int(rng.integers(2, 9))), 0, 1).astype(np.float32)
    if kind == "smeared":  # a real scene with blurred edges, speckle and a colour cast
        spec = world.sample_specs(1, rng)[0]
        image = _box_blur(world.render(spec, rng), int(rng.integers(1, 3)))
        image = image * rng.uniform(0.6, 1.2, size=3) + rng.normal(0, 0.08, image.shape)
        return np.clip(image, 0, 1).astype(np.float32)
    raise ValueError(f"kind must be one of {OFF_DISTRIBUTION_KINDS}, got {kind!r}")


def off_distribution(n: int, rng: np.random.Generator,
                     kinds: tuple[str, ...] = OFF_DISTRIBUTION_KINDS) -> np.ndarray:
    """``n`` off-distribution images [n, H, W, 3], kinds in turn."""
    return np.stack([off_distribution_image(kinds[i % len(kinds)], rng) for i in range(n)])
