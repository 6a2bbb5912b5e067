"""CLIP's tokenizer (vard_jax.tokenizer) against transformers' CLIPTokenizer.

``tests/reference/data/tokenizer.*`` holds what transformers' ``CLIPTokenizer`` (5.x) gives on the
shipped shapes vocabulary for texts with casing, extra spaces, punctuation, unknown words,
accents and truncation (written by ``tests/reference/make_reference.py``).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from vard_jax import tokenizer as tokenizer_lib
from vard_jax.models import shapes as shapes_model
from vard_jax.worlds import shapes as world

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "data"
SHIPPED = shapes_model.ASSET_DIR / "tokenizer"


@pytest.fixture(scope="module")
def reference():
    return json.loads((REFERENCE / "tokenizer.json").read_text()), np.load(
        REFERENCE / "tokenizer.npz")["ids"]


def test_ids_match_transformers(reference):
    record, ids = reference
    tokenizer = tokenizer_lib.CLIPTokenizer.from_directory(SHIPPED, model_max_length=16)
    np.testing.assert_array_equal(tokenizer.ids(record["texts"], 16), ids)
    assert tokenizer.ids(record["texts"]).dtype == np.int32
    assert tokenizer.token_ids(record["texts"]) == record["full_ids"]
    for row, text in zip(record["full_ids"], record["decoded"]):
        assert tokenizer.decode(row) == text


def test_tokenizer_json_and_configs_are_read(reference, tmp_path):
    """A folder with tokenizer.json (as many hub repositories have) gives the same ids; the
    padding token and maximum length come from tokenizer_config.json."""
    record, ids = reference
    saved = tokenizer_lib.CLIPTokenizer.from_directory(SHIPPED, model_max_length=16)
    saved.save(tmp_path / "files")
    again = tokenizer_lib.CLIPTokenizer.from_directory(tmp_path / "files")
    assert again.model_max_length == 16
    np.testing.assert_array_equal(again.ids(record["texts"]), ids)
    (tmp_path / "json").mkdir()
    saved._tokenizer.save(str(tmp_path / "json" / tokenizer_lib.TOKENIZER_FILE))
    shutil.copy(tmp_path / "files" / tokenizer_lib.CONFIG_FILE, tmp_path / "json")
    from_json = tokenizer_lib.CLIPTokenizer.from_directory(tmp_path / "json")
    np.testing.assert_array_equal(from_json.ids(record["texts"]), ids)
    config = json.loads((tmp_path / "files" / tokenizer_lib.CONFIG_FILE).read_text())
    config["pad_token"] = {"content": tokenizer_lib.BOS_TOKEN}  # SD 2.x pads with a token of its own
    (tmp_path / "files" / tokenizer_lib.CONFIG_FILE).write_text(json.dumps(config))
    padded = tokenizer_lib.CLIPTokenizer.from_directory(tmp_path / "files").ids(["a red circle"])
    assert padded[0, -1] == saved.bos_token_id and padded[0, 4] == saved.eos_token_id


def test_every_word_of_the_world_is_one_known_token():
    tokenizer = tokenizer_lib.CLIPTokenizer.from_directory(SHIPPED)
    for word in world.words():
        ids = tokenizer.token_ids([word])[0]
        assert len(ids) == 3 and tokenizer.unk_token_id not in ids[1:-1], word


def test_missing_files_and_tokens_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json or vocab.json"):
        tokenizer_lib.CLIPTokenizer.from_directory(tmp_path)
    with pytest.raises(ValueError, match="the pad_token '<pad>' is not in the vocabulary"):
        tokenizer_lib.CLIPTokenizer.from_files(SHIPPED / "vocab.json", SHIPPED / "merges.txt",
                                               pad_token="<pad>")
