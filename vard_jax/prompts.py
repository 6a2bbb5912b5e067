"""Prompt sets: a named split of the shapes world, or a UTF-8 text file with one prompt a line."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from absl import logging

from vard_jax.worlds import shapes as world

# Evaluation noise is seeded by ``train.seed + EVAL_NOISE_SEED_OFFSET`` (the loop's evaluation
# and ``vard_jax.evaluate`` alike), apart from the seeds of training draws.
EVAL_NOISE_SEED_OFFSET = 1_000_003


#: Prompt sets shipped with the package, by name (one prompt a line): the 45 animal names
#: of DDPO's training prompts, and 16 other animals as held-out prompts.
PROMPT_SET_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "prompts"
PROMPT_SETS = ("animals", "animals_heldout")


def load_prompts(spec: str) -> list[str]:
    """The prompts of ``spec``: "train"/"heldout" (shapes world), a shipped set (``PROMPT_SETS``)
    or a path to a text file."""
    if spec in world.SPLITS:
        return world.all_prompts(spec)
    if spec in PROMPT_SETS:
        spec = str(PROMPT_SET_DIR / f"{spec}.txt")
    path = pathlib.Path(spec)
    if path.is_dir():
        raise ValueError(f"prompts file {spec} is a directory; give a text file with one prompt "
                         "per line")
    if not path.is_file():
        raise ValueError(f"prompt set {spec!r} is neither a split ({', '.join(world.SPLITS)}), "
                         f"a shipped set ({', '.join(PROMPT_SETS)}) nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts file {spec} is not UTF-8 text (byte {error.start}); "
                         "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {spec} has no prompts; write one prompt per line")
    return prompts


def warn_if_truncated(prompts: list[str], pipeline, source: str) -> int:
    """Logs one warning when prompts are longer than the tokenizer's ``pipeline.max_length``
    tokens (the model sees them truncated to it); returns how many are."""
    lengths = [len(row) for row in pipeline.tokenizer.token_ids(list(prompts))]
    long = [i for i, length in enumerate(lengths) if length > pipeline.max_length]
    if long:
        first = prompts[long[0]]
        logging.warning("prompt set %s: %d of %d prompts are longer than the tokenizer's %d tokens "
                        "and are truncated to them (first: %r, %d tokens)", source, len(long),
                        len(prompts), pipeline.max_length, first[:80], lengths[long[0]])
    return len(long)


def draw(prompts: list[str], count: int, seed: int, *salt: int) -> list[str]:
    """``count`` prompts drawn uniformly with replacement, deterministic in (seed, salt)."""
    rng = np.random.default_rng([seed, *salt])
    return [prompts[i] for i in rng.integers(len(prompts), size=count)]


def padded_batches(prompts: Sequence[str], batch_size: int) -> list[tuple[list[str], int]]:
    """``prompts`` in consecutive batches of ``batch_size``, the last one padded with its own
    first prompt (every batch one shape: one compiled program): [(batch, real prompts)]."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        out.append((chunk + chunk[:1] * (batch_size - len(chunk)), len(chunk)))
    return out


def fixed(prompts: list[str], count: int, seed: int) -> list[str]:
    """A fixed evaluation list: a seeded permutation of the set, cycled to ``count``."""
    order = np.random.default_rng([seed, 12345]).permutation(len(prompts))
    return [prompts[order[i % len(prompts)]] for i in range(count)]
