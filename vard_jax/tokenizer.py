"""Text encoders' tokenizers on the ``tokenizers`` library (no transformers needed): CLIP's
byte-level BPE (``CLIPTokenizer``) and T5's SentencePiece Unigram (``T5Tokenizer``, SD3's third).

``CLIPTokenizer`` reads a tokenizer folder as the hub stores it: ``tokenizer.json`` when
present, else ``vocab.json`` + ``merges.txt``, with ``tokenizer_config.json`` /
``special_tokens_map.json`` for the maximum length and the special tokens (SD 2.x pads with
``"!"``, SD 1.x with ``<|endoftext|>``). Text is normalised as CLIP does (NFC, runs of
whitespace to one space, lower case), split into words, numbers and punctuation, byte-level
encoded, and merged by BPE with ``</w>`` marking the end of a word.

``ids(texts, length)`` gives ``[B, length]`` int32: start token, the text's tokens (truncated to
``length - 2``), end token, then padding: what transformers' ``CLIPTokenizer`` returns with
``padding="max_length", truncation=True`` (checked against it in the tests).

``T5Tokenizer`` reads ``tokenizer.json`` (with the same two configs), which holds the whole
pipeline: normaliser, whitespace split with ``▁`` marking word starts, Unigram pieces.
``ids(texts, length)`` gives the text's tokens (truncated to ``length - 1``), ``</s>``, then
``<pad>``: what transformers' ``T5TokenizerFast`` returns with ``padding="max_length",
truncation=True`` (SD3 asks for 256 tokens); ``ids_and_mask`` adds the attention mask (1 for the
tokens and ``</s>``).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
#: CLIP's pattern of pieces: contractions, letter runs, single digits, other non-space runs.
_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MERGES_HEADER = "#version: 0.2"


def _token(value: Any) -> Optional[str]:
    """A special token as stored in the configs: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                     continuing_subword_prefix="",
                                     end_of_word_suffix=END_OF_WORD, fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_merges(file: pathlib.Path) -> list[tuple[str, str]]:
    merges = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        first, second = line.split()
        merges.append((first, second))
    return merges


class _BackedTokenizer:
    """What both tokenizers take from the ``tokenizers`` object in ``self._tokenizer``."""

    _tokenizer: Any

    def _set_up(self, tokenizer: Any, model_max_length: int, source: str,
                **special_tokens: str) -> None:
        """Keeps the tokenizer and the ids of its special tokens (``<role>_id``); a token not
        in the vocabulary stops with one line naming ``source``."""
        self._tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        self.special_tokens = dict(special_tokens)
        self._special_ids = {}
        for role, token in self.special_tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{source}: the {role} {token!r} is not in the vocabulary")
            self._special_ids[role] = token_id
        self.eos_token_id = self._special_ids["eos_token"]
        self.pad_token_id = self._special_ids["pad_token"]
        self.unk_token_id = self._special_ids["unk_token"]

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens


class CLIPTokenizer(_BackedTokenizer):
    """See the module docstring. Build with ``from_directory`` or ``from_files``."""

    def __init__(self, tokenizer: Any, model_max_length: int, bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN, pad_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, source: str = "tokenizer"):
        self._set_up(tokenizer, model_max_length, source, bos_token=bos_token,
                     eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)
        self.bos_token_id = self._special_ids["bos_token"]

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                   model_max_length: int = 77, **special_tokens: str) -> "CLIPTokenizer":
        vocab = json.loads(pathlib.Path(vocab_file).read_text(encoding="utf-8"))
        unk = special_tokens.get("unk_token", EOS_TOKEN)
        tokenizer = _bpe_tokenizer(vocab, _read_merges(pathlib.Path(merges_file)), unk)
        return cls(tokenizer, model_max_length, source=str(vocab_file), **special_tokens)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike,
                       model_max_length: Optional[int] = None) -> "CLIPTokenizer":
        """The tokenizer stored in ``directory`` (see the module docstring)."""
        directory = pathlib.Path(directory)
        settings: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # the config has the last word
            if (directory / name).is_file():
                settings.update(json.loads((directory / name).read_text(encoding="utf-8")))
        special = {role: _token(settings[role]) for role in
                   ("bos_token", "eos_token", "pad_token", "unk_token")
                   if _token(settings.get(role))}
        length = model_max_length or settings.get("model_max_length") or 77
        length = 77 if length > 10 ** 6 else length  # "no limit" sentinel of some configs
        if (directory / TOKENIZER_FILE).is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
            tokenizer.post_processor = None  # the special tokens are added by ``ids``
            tokenizer.no_padding()
            tokenizer.no_truncation()
            return cls(tokenizer, length, source=str(directory), **special)
        missing = [n for n in (VOCAB_FILE, MERGES_FILE) if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"no tokenizer in {directory}: expected {TOKENIZER_FILE} or "
                                    f"{VOCAB_FILE} + {MERGES_FILE}")
        return cls.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, length, **special)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens with the start and end tokens, neither truncated nor padded."""
        encoded = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_token_id, *e.ids, self.eos_token_id] for e in encoded]

    def ids(self, texts: Sequence[str], length: Optional[int] = None) -> np.ndarray:
        """[B, length] int32 (default length: ``model_max_length``); see the module docstring."""
        length = int(length or self.model_max_length)
        if length < 2:
            raise ValueError(f"token length {length}: needs room for the start and end tokens")
        out = np.full((len(texts), length), self.pad_token_id, np.int32)
        for row, encoded in enumerate(self._tokenizer.encode_batch(list(texts),
                                                                   add_special_tokens=False)):
            tokens = [self.bos_token_id, *encoded.ids[:length - 2], self.eos_token_id]
            out[row, :len(tokens)] = tokens
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        kept = [int(i) for i in ids if not (skip_special_tokens and int(i) in special)]
        return self._tokenizer.decode(kept, skip_special_tokens=False).replace(
            END_OF_WORD, " ").strip()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the hub layout: ``vocab.json``, ``merges.txt`` and the two configs."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = json.loads(self._tokenizer.to_str())["model"]
        (directory / VOCAB_FILE).write_text(json.dumps(model["vocab"], ensure_ascii=False),
                                            encoding="utf-8")
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        (directory / MERGES_FILE).write_text("\n".join([MERGES_HEADER, *merges]) + "\n",
                                             encoding="utf-8")
        config = dict(self.special_tokens, model_max_length=self.model_max_length,
                      tokenizer_class="CLIPTokenizer")
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(self.special_tokens, indent=2)
                                                     + "\n")


T5_EOS_TOKEN, T5_PAD_TOKEN, T5_UNK_TOKEN = "</s>", "<pad>", "<unk>"
#: The length ``ids`` pads to when neither the caller nor the configs say (transformers' T5).
T5_MAX_LENGTH = 512


class T5Tokenizer(_BackedTokenizer):
    """T5's tokenizer (see the module docstring). Build with ``from_directory``."""

    def __init__(self, tokenizer: Any, model_max_length: int = T5_MAX_LENGTH,
                 eos_token: str = T5_EOS_TOKEN, pad_token: str = T5_PAD_TOKEN,
                 unk_token: str = T5_UNK_TOKEN, source: str = "tokenizer"):
        self._set_up(tokenizer, model_max_length, source, eos_token=eos_token,
                     pad_token=pad_token, unk_token=unk_token)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike,
                       model_max_length: Optional[int] = None) -> "T5Tokenizer":
        """The tokenizer stored in ``directory`` (``tokenizer.json`` and the configs)."""
        from tokenizers import Tokenizer

        directory = pathlib.Path(directory)
        if not (directory / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: expected {TOKENIZER_FILE}")
        settings: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # the config has the last word
            if (directory / name).is_file():
                settings.update(json.loads((directory / name).read_text(encoding="utf-8")))
        special = {role: _token(settings[role]) for role in ("eos_token", "pad_token", "unk_token")
                   if _token(settings.get(role))}
        length = model_max_length or settings.get("model_max_length") or T5_MAX_LENGTH
        length = T5_MAX_LENGTH if length > 10 ** 6 else length  # "no limit" sentinel
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        tokenizer.post_processor = None  # ``</s>`` is added by ``ids``
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, length, source=str(directory), **special)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens and ``</s>``, neither truncated nor padded."""
        encoded = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[*e.ids, self.eos_token_id] for e in encoded]

    def ids_and_mask(self, texts: Sequence[str], length: Optional[int] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``ids`` and its attention mask, both [B, length] int32 (1 = token or ``</s>``)."""
        length = int(length or self.model_max_length)
        if length < 1:
            raise ValueError(f"token length {length}: needs room for the end token")
        ids = np.full((len(texts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for row, encoded in enumerate(self._tokenizer.encode_batch(list(texts),
                                                                   add_special_tokens=False)):
            tokens = [*encoded.ids[:length - 1], self.eos_token_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask

    def ids(self, texts: Sequence[str], length: Optional[int] = None) -> np.ndarray:
        """[B, length] int32 (default length: ``model_max_length``); see the module docstring."""
        return self.ids_and_mask(texts, length)[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; ``skip_special_tokens`` leaves out ``</s>``, ``<pad>`` and
        ``<unk>`` (every special token of ``tokenizer.json``), as transformers does."""
        return self._tokenizer.decode([int(i) for i in ids],
                                      skip_special_tokens=skip_special_tokens)
