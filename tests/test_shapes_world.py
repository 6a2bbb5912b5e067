"""Tests of the shapes world: generator, caption grammar, tokenizer files and shape fidelity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vard_jax.rewards.shape_fidelity import connected_components, fidelity_terms, shape_fidelity
from vard_jax.worlds import negatives, shapes
from vard_jax.worlds.tokenizer_files import (
    MAX_LENGTH,
    encode_captions,
    load_tokenizer,
    write_tokenizer_files,
)

ALL_CAPTIONS = shapes.all_prompts("train") + shapes.all_prompts("heldout")


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def test_generate_is_deterministic_per_seed() -> None:
    images_a, captions_a = shapes.generate(32, seed=7)
    images_b, captions_b = shapes.generate(32, seed=7)
    images_c, captions_c = shapes.generate(32, seed=8)
    np.testing.assert_array_equal(images_a, images_b)
    assert captions_a == captions_b
    assert captions_a != captions_c
    assert not np.array_equal(images_a, images_c)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_images_shape_dtype_range(split: str) -> None:
    images, captions = shapes.generate(64, seed=0, split=split)
    assert images.shape == (64, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, shapes.CHANNELS)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert len(captions) == 64


def test_rendered_scene_matches_spec() -> None:
    rng = np.random.default_rng(3)
    for spec in shapes.sample_specs(200, rng, "train"):
        image = np.round(shapes.render(spec, rng) * 255).astype(np.int32)  # [H, W, 3]
        background = np.all(image == shapes.BACKGROUNDS[spec.background], axis=-1)
        shape_pixels = np.all(image == shapes.COLORS[spec.color], axis=-1)
        assert np.all(background | shape_pixels), "only the two colours of the spec are drawn"
        assert background[0].all() and background[-1].all()  # one-pixel margin at the edge
        assert background[:, 0].all() and background[:, -1].all()
        labels = connected_components(shape_pixels[None])[0]
        assert len(np.unique(labels[labels > 0])) == spec.count, "shapes are separate components"
        if spec.position is not None:
            rows, cols = np.nonzero(shape_pixels)
            centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
            assert shapes.region_of(*centre) == spec.position


def test_heldout_pairs_never_in_train() -> None:
    assert len(shapes.HELDOUT_PAIRS) == 4
    train_specs = [shapes.parse_caption(c) for c in shapes.all_prompts("train")]
    heldout_specs = [shapes.parse_caption(c) for c in shapes.all_prompts("heldout")]
    assert all((s.color, s.shape) not in shapes.HELDOUT_PAIRS for s in train_specs)
    assert all((s.color, s.shape) in shapes.HELDOUT_PAIRS for s in heldout_specs)
    _, sampled = shapes.generate(500, seed=1, split="train")
    assert all(shapes.parse_caption(c).split == "train" for c in sampled)
    _, sampled = shapes.generate(100, seed=1, split="heldout")
    assert all(shapes.parse_caption(c).split == "heldout" for c in sampled)
    # Every colour and every shape still occurs in training.
    assert {s.color for s in train_specs} == set(shapes.COLORS)
    assert {s.shape for s in train_specs} == set(shapes.SHAPES)
    assert set(shapes.prompts("train")) <= set(shapes.all_prompts("train"))
    assert set(shapes.prompts("heldout")) <= set(shapes.all_prompts("heldout"))


def test_shape_and_background_palettes_are_disjoint() -> None:
    shape_rgb = np.asarray(list(shapes.COLORS.values()), dtype=float)  # [C, 3]
    background_rgb = np.asarray(list(shapes.BACKGROUNDS.values()), dtype=float)  # [G, 3]
    distance = np.linalg.norm(shape_rgb[:, None] - background_rgb[None], axis=-1)  # [C, G]
    assert distance.min() > 100


# ----------------------------------------------------------------------------------------------
# Caption grammar
# ----------------------------------------------------------------------------------------------


def test_caption_round_trip() -> None:
    assert len(set(ALL_CAPTIONS)) == len(ALL_CAPTIONS)
    for caption in ALL_CAPTIONS:
        assert shapes.caption_of(shapes.parse_caption(caption)) == caption


def test_parse_caption_examples() -> None:
    spec = shapes.parse_caption("a green triangle at the top left on a black background")
    assert spec == shapes.SceneSpec(1, "triangle", "green", "black", "top left")
    assert shapes.parse_caption("Three  RED squares on a navy background") == shapes.SceneSpec(
        3, "square", "red", "navy", None
    )


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "a cat on a mat",
        "a red circles on a white background",  # plural after "a"
        "two red circle on a white background",  # singular after "two"
        "two red circles at the top left on a white background",  # position with several shapes
        "a red circle on a red background",  # shape colour as background
        "a pink circle on a white background",  # unknown colour
        "a red circle on a white background please",
    ],
)
def test_parse_caption_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError):
        shapes.parse_caption(junk)


def test_words_cover_every_caption() -> None:
    vocabulary = shapes.words()
    assert vocabulary == sorted(set(vocabulary))
    assert {w for c in ALL_CAPTIONS for w in c.split()} == set(vocabulary)


# ----------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path)
    with open(tmp_path / "merges.txt", encoding="utf-8") as handle:
        assert handle.readline().startswith("#version")
    tokenizer = load_tokenizer(tmp_path)
    assert len(json.loads((tmp_path / "vocab.json").read_text())) < 512
    assert tokenizer.model_max_length == MAX_LENGTH
    for word in shapes.words():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    for caption in ALL_CAPTIONS:
        ids = tokenizer.token_ids([caption])[0]
        assert len(ids) == len(caption.split()) + 2 <= MAX_LENGTH
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    ids = encode_captions(tokenizer, ALL_CAPTIONS)
    assert ids.shape == (len(ALL_CAPTIONS), MAX_LENGTH) and ids.dtype == np.int32
    assert np.all(ids[:, 0] == tokenizer.bos_token_id)
    # Text outside the grammar still tokenizes, into single characters.
    assert tokenizer.tokenize("pink") == ["p", "i", "n", "k</w>"]
    assert tokenizer.unk_token_id not in tokenizer.token_ids(["a pink hexagon"])[0][1:-1]


# ----------------------------------------------------------------------------------------------
# Shape fidelity
# ----------------------------------------------------------------------------------------------


def _mismatched(caption: str, field: str, rng: np.random.Generator) -> str:
    spec = shapes.parse_caption(caption)
    options = {
        "color": [c for c in shapes.COLORS if c != spec.color],
        "shape": [s for s in shapes.SHAPES if s != spec.shape],
        "count": [n for n in shapes.COUNT_WORDS if n != spec.count],
        "background": [b for b in shapes.BACKGROUNDS if b != spec.background],
    }[field]
    changes: dict[str, object] = {field: options[int(rng.integers(len(options)))]}
    if field == "count":
        changes["position"] = None
    return shapes.caption_of(dataclasses.replace(spec, **changes))


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_fidelity_of_real_images_near_one(split: str) -> None:
    images, captions = shapes.generate(300, seed=11, split=split)
    scores = shape_fidelity(images, captions)
    assert scores.shape == (300,) and scores.dtype == np.float32
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert scores.mean() >= 0.95


def test_fidelity_lower_for_mismatched_prompts() -> None:
    images, captions = shapes.generate(200, seed=5)
    real = shape_fidelity(images, captions).mean()
    rng = np.random.default_rng(0)
    means = {}
    for field in ("color", "shape", "count", "background"):
        wrong = [_mismatched(c, field, rng) for c in captions]
        means[field] = shape_fidelity(images, wrong).mean()
        assert means[field] <= real - 0.15, (field, means[field])
    assert np.mean(list(means.values())) <= real - 0.3
    assert means["color"] <= 0.3


def test_fidelity_tolerates_moderate_noise() -> None:
    images, captions = shapes.generate(100, seed=2)
    noisy = np.clip(images + 0.08 * np.random.default_rng(0).standard_normal(images.shape), 0, 1)
    assert shape_fidelity(noisy.astype(np.float32), captions).mean() >= 0.9


def _canvas(background: str) -> np.ndarray:
    image = np.zeros((1, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), dtype=np.float32)
    image[...] = np.asarray(shapes.BACKGROUNDS[background], dtype=np.float32) / 255.0
    return image


def test_fidelity_on_hand_drawn_images() -> None:
    red = np.asarray(shapes.COLORS["red"], dtype=np.float32) / 255.0
    square = _canvas("white")
    square[0, 10:20, 12:22] = red  # one 10x10 red square near the centre
    good = shape_fidelity(square, ["a red square on a white background"])[0]
    assert good >= 0.95
    assert shape_fidelity(square, ["a red square in the center on a white background"])[0] >= 0.95
    assert shape_fidelity(square, ["two red squares on a white background"])[0] <= good - 0.1
    assert shape_fidelity(square, ["a red circle on a white background"])[0] <= good - 0.2
    assert shape_fidelity(square, ["a blue square on a white background"])[0] <= 0.3
    assert shape_fidelity(square, ["a red square on a gray background"])[0] <= good - 0.15
    top_left = "a red square at the top left on a white background"
    assert shape_fidelity(square, [top_left])[0] <= good - 0.1

    disc = _canvas("black")
    rows, cols = np.mgrid[: shapes.IMAGE_SIZE, : shapes.IMAGE_SIZE]
    disc[0, (rows - 20) ** 2 + (cols - 9) ** 2 <= 36] = red  # radius-6 disc, bottom left
    terms = fidelity_terms(disc, ["a red circle at the bottom left on a black background"])
    assert terms["shape"][0] == 1.0 and terms["position"][0] == 1.0 and terms["score"][0] >= 0.95


def test_fidelity_of_noise_is_low() -> None:
    _, captions = shapes.generate(100, seed=4)
    noise = np.random.default_rng(1).random((100, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3))
    assert shape_fidelity(noise.astype(np.float32), captions).mean() <= 0.25


def test_fidelity_validates_input() -> None:
    caption = ["a red square on a white background"]
    with pytest.raises(ValueError):
        shape_fidelity(np.zeros((1, 3, 32, 32), dtype=np.float32), caption)  # NCHW
    with pytest.raises(ValueError):
        shape_fidelity(np.zeros((32, 32, 3), dtype=np.float32), caption)  # no batch axis
    with pytest.raises(ValueError):
        shape_fidelity(np.zeros((1, 32, 32, 3), dtype=np.uint8), caption)  # not float
    with pytest.raises(ValueError):
        shape_fidelity(np.zeros((2, 32, 32, 3), dtype=np.float32), caption)  # count mismatch
    with pytest.raises(ValueError):
        shape_fidelity(np.zeros((1, 32, 32, 3), dtype=np.float32), ["a red hexagon"])


# ----------------------------------------------------------------------------------------------
# Negatives for the reward model
# ----------------------------------------------------------------------------------------------


def _changed_fields(a: shapes.SceneSpec, b: shapes.SceneSpec) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_hard_negatives_change_one_attribute_and_keep_heldout_pairs_unseen() -> None:
    rng = np.random.default_rng(0)
    for spec in shapes.sample_specs(200, rng, "train") + shapes.sample_specs(50, rng, "heldout"):
        variants = negatives.hard_negatives(spec, 3, rng)
        assert len(variants) == 3
        for variant in variants:
            changed = _changed_fields(spec, variant)
            # A count change drops the position of a single shape: still one attribute.
            assert changed in ({"color"}, {"shape"}, {"count"}, {"count", "position"},
                               {"position"}, {"background"}), changed
            # Training draws train scenes only: their variants never show a held-out pair.
            if spec.split == "train" or changed & {"color", "shape"}:
                assert variant.split == "train"
            assert shapes.caption_of(variant) != shapes.caption_of(spec)
    unplaced = shapes.SceneSpec(2, "circle", "red", "white")
    assert negatives.attribute_variant(unplaced, "position", rng) is None
    with pytest.raises(ValueError, match="attribute must be one of"):
        negatives.attribute_variant(unplaced, "size", rng)


@pytest.mark.parametrize("kind", negatives.OFF_DISTRIBUTION_KINDS)
def test_off_distribution_images_match_no_caption(kind: str) -> None:
    rng = np.random.default_rng(1)
    images = negatives.off_distribution(32, rng, (kind,))
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    captions = [shapes.caption_of(s) for s in shapes.sample_specs(32, rng, "train")]
    real, real_captions = shapes.generate(32, seed=2)
    assert shape_fidelity(images, captions).mean() < 0.25
    assert shape_fidelity(real, real_captions).mean() > 0.95


@pytest.mark.parametrize("kind", negatives.CORRUPTIONS)
def test_corrupted_renderings_are_wrong_for_their_caption(kind: str) -> None:
    rng = np.random.default_rng(3)
    specs = shapes.sample_specs(32, rng, "train")
    images = np.stack([negatives.corrupted(s, kind, rng) for s in specs])
    assert images.shape == (32, 32, 32, 3) and images.min() >= 0.0 and images.max() <= 1.0
    # The gold program agrees that they are wrong: below real renderings (~1.0); grown shapes
    # keep their colour and count, so it docks them least (their size and outline).
    captions = [shapes.caption_of(s) for s in specs]
    assert shape_fidelity(images, captions).mean() < (0.85 if kind == "grown" else 0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        negatives.corrupted(specs[0], "inverted", rng)


def test_all_variants_are_every_scene_one_attribute_away() -> None:
    placed = shapes.SceneSpec(1, "circle", "red", "white", "top left")
    variants = negatives.all_variants(placed)
    assert len(variants) == negatives.MAX_VARIANTS == 17
    assert len({shapes.caption_of(v) for v in variants}) == 17
    for variant in variants:
        assert _changed_fields(placed, variant) in ({"color"}, {"shape"}, {"count", "position"},
                                                    {"position"}, {"background"})
    three = shapes.SceneSpec(3, "square", "blue", "navy")
    assert len(negatives.all_variants(three)) == 5 + 2 + 2 + 4
