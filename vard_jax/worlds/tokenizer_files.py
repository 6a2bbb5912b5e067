"""A tiny CLIP BPE tokenizer for the shapes-world caption grammar.

CLIP's tokenizer (``vard_jax.tokenizer``) splits a word ``w`` into characters, marks the last one with the
end-of-word suffix (``"e"`` -> ``"e</w>"``) and then repeatedly merges the adjacent pair with the
lowest rank in ``merges.txt``. ``write_tokenizer_files`` builds a merge list under which every
caption word collapses into exactly ONE token, and a vocabulary holding

* the single characters ``a-z`` and ``0-9``, each with and without ``</w>`` (so text outside the
  grammar still tokenizes, character by character),
* every token a merge can produce (caption words and their intermediate pieces),
* the special tokens ``<|startoftext|>`` and ``<|endoftext|>`` (the latter doubles as unk / pad).

The merges are found greedily: for each word, simulate the tokenizer's BPE with the merges so far
and, while it ends in several pieces, append the merge of its first two pieces. An appended merge
has the highest rank, so it never changes how an already collapsed word is merged (at each of
that word's steps a lower-ranked merge was applicable). The result is verified against the real
tokenizer in the tests.
"""

from __future__ import annotations

import json
import os
import string
from typing import Sequence

import numpy as np

from vard_jax.tokenizer import (BOS_TOKEN, END_OF_WORD, EOS_TOKEN, MERGES_FILE, MERGES_HEADER,
                                VOCAB_FILE, CLIPTokenizer)
from vard_jax.worlds import shapes

#: Sequence length of encoded captions: the longest caption has 11 words, +2 for bos/eos = 13.
MAX_LENGTH: int = 16

_CHARACTERS: str = string.ascii_lowercase + string.digits


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word under merge ``ranks`` (same algorithm as the tokenizer)."""
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        pairs = [(pieces[i], pieces[i + 1]) for i in range(len(pieces) - 1)]
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_merges(vocabulary_words: Sequence[str]) -> list[tuple[str, str]]:
    """Merge list (lowest rank first) under which each word becomes one token."""
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words:
        if not word or any(ch not in _CHARACTERS for ch in word):
            raise ValueError(
                f"caption word {word!r} must be non-empty lower-case ascii letters/digits"
            )
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _bpe(word, ranks)
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id: characters, characters + ``</w>``, merge results, then the special tokens."""
    tokens: list[str] = list(_CHARACTERS) + [ch + END_OF_WORD for ch in _CHARACTERS]
    tokens += [first + second for first, second in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Write ``vocab.json`` and ``merges.txt`` for the shapes-world grammar into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    merges = build_merges(shapes.words())
    vocab = build_vocab(merges)
    with open(os.path.join(directory, VOCAB_FILE), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    with open(os.path.join(directory, MERGES_FILE), "w", encoding="utf-8") as handle:
        # CLIPTokenizer skips the first line of merges.txt (the version header).
        handle.write(MERGES_HEADER + "\n")
        for first, second in merges:
            handle.write(f"{first} {second}\n")


def load_tokenizer(directory: str | os.PathLike[str]) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over the files in ``directory`` (see ``write_tokenizer_files``):
    ``model_max_length`` is ``MAX_LENGTH``, ``<|endoftext|>`` pads."""
    return CLIPTokenizer.from_files(os.path.join(directory, VOCAB_FILE),
                                    os.path.join(directory, MERGES_FILE), MAX_LENGTH)


def encode_captions(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> np.ndarray:
    """Token ids int32 [B, MAX_LENGTH]: bos, caption tokens, eos, then eos padding."""
    return tokenizer.ids(list(captions), MAX_LENGTH)
