"""The project's T5 encoder and T5 tokenizer against transformers' ``T5EncoderModel`` and
``T5TokenizerFast``.

``tests/reference/data/t5_*`` hold transformers' outputs (written by
``tests/reference/make_reference.py``): tiny random encoders, one gated-GELU (T5 v1.1, SD3's
``text_encoder_3``) and one ReLU (the original T5, attention narrower than ``d_model``), on
token ids without padding, and padded with and without the attention mask; their relative
position buckets for distances up to 600; and the ids of a tiny Unigram tokenizer in T5's layout
(``t5_tokenizer_files/``).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import weights as reference_weights
from vard_jax import tokenizer as tokenizer_lib
from vard_jax.models.nn import t5 as t5_lib
from vard_jax.models.nn import weights as weights_lib

DATA = pathlib.Path(__file__).resolve().parent / "reference" / "data"
CASES = ["t5_gated_gelu", "t5_relu"]


def _case(name: str, directory: pathlib.Path) -> tuple[dict, dict, dict]:
    """The recorded case, its weights written as ``model.safetensors`` + ``config.json``."""
    record = json.loads((DATA / f"{name}.json").read_text())
    arrays = dict(np.load(DATA / f"{name}.npz"))
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    weights_lib.save_state_dict(directory, record["config"], state,
                                weights_lib.TRANSFORMERS_WEIGHTS)
    return record, arrays, state


def _max_error(got, want) -> float:
    """The largest difference relative to max(1, |want|)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


def _outputs(module, params, arrays) -> dict:
    apply = jax.jit(module.apply)
    return {"last_hidden_state": apply({"params": params}, arrays["input_ids"]),
            "masked_last_hidden_state": apply({"params": params}, arrays["padded_ids"],
                                              arrays["attention_mask"]),
            "unmasked_last_hidden_state": apply({"params": params}, arrays["padded_ids"])}


@pytest.mark.parametrize("name", CASES)
def test_encoder_matches_transformers(name, tmp_path):
    record, arrays, _ = _case(name, tmp_path)
    encoder, params = weights_lib.load_t5_encoder(tmp_path)
    assert encoder.config.is_gated_act == (name == "t5_gated_gelu")
    for key, got in _outputs(encoder, params, arrays).items():
        assert got.dtype == jnp.float32
        assert _max_error(got, arrays[key]) < 1e-4, key
    # padding changes the attended keys: the mask matters
    assert _max_error(_outputs(encoder, params, arrays)["unmasked_last_hidden_state"],
                      arrays["masked_last_hidden_state"]) > 1e-2


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_computation_stays_within_bfloat16_tolerance(name, tmp_path):
    """Computing in bfloat16 (float32 weights): the float32 reference to 3e-2, or to the
    distance of transformers' own bfloat16 run from it where that is larger (the unscaled
    attention scores of these random weights are large: 6.0e-2 gated, 3.2e-2 ReLU)."""
    record, arrays, _ = _case(name, tmp_path)
    encoder, params = weights_lib.load_t5_encoder(tmp_path, dtype=jnp.bfloat16)
    tolerance = max(3e-2, record["bfloat16_error"])
    for key, got in _outputs(encoder, params, arrays).items():
        assert got.dtype == jnp.bfloat16
        error = _max_error(got, arrays[key])
        assert 1e-4 < error < tolerance, (key, error)  # bfloat16 rounding, not float32


def test_chunked_attention_gives_the_same_output(tmp_path):
    _, arrays, _ = _case("t5_gated_gelu", tmp_path)
    encoder, params = weights_lib.load_t5_encoder(tmp_path, implementation="chunked")
    for key, got in _outputs(encoder, params, arrays).items():
        assert _max_error(got, arrays[key]) < 1e-4, key


@pytest.mark.parametrize("name", CASES)
def test_relative_position_buckets_match_transformers(name):
    record = json.loads((DATA / f"{name}.json").read_text())
    arrays = np.load(DATA / f"{name}.npz")
    relative = arrays["relative_position"]  # -n ... n
    n = len(relative) // 2
    # the query at position n of 2n + 1 keys sees every distance in [-n, n]
    got = t5_lib.relative_position_buckets(
        n + 1, len(relative), record["config"]["relative_attention_num_buckets"],
        record["config"]["relative_attention_max_distance"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got[n], arrays["buckets"])


def test_checkpoint_layouts(tmp_path):
    """The tied ``encoder.embed_tokens.weight`` beside ``shared.weight`` or instead of it, a
    whole T5 checkpoint (decoder left out), and Flax msgpack weights in the same tree."""
    from flax import serialization
    from safetensors.numpy import save_file

    record, arrays, state = _case("t5_relu", tmp_path)
    _, want = weights_lib.load_t5_encoder(tmp_path)
    file = tmp_path / weights_lib.TRANSFORMERS_WEIGHTS.safetensors
    layouts = {
        "both": dict(state, **{weights_lib.T5_TIED_EMBEDDING: state["shared.weight"]}),
        "tied only": {weights_lib.T5_TIED_EMBEDDING if k == "shared.weight" else k: v
                      for k, v in state.items()},
        "whole T5": dict(state, **{"decoder.final_layer_norm.weight": np.ones(32, np.float32),
                                   "lm_head.weight": state["shared.weight"]}),
    }
    for layout, tensors in layouts.items():
        save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(file))
        _, got = weights_lib.load_t5_encoder(tmp_path)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    file.unlink()
    decoder = {"decoder": {"final_layer_norm": {"weight": np.ones(32, np.float32)}}}
    (tmp_path / weights_lib.TRANSFORMERS_WEIGHTS.flax).write_bytes(
        serialization.msgpack_serialize(dict(jax.device_get(want), **decoder)))
    encoder, got = weights_lib.load_t5_encoder(tmp_path)
    assert _max_error(encoder.apply({"params": got}, arrays["input_ids"]),
                      arrays["last_hidden_state"]) < 1e-4


def test_sharded_weights_are_read_and_missing_ones_are_one_line(tmp_path):
    """Weights split into shards with an index (as the hub stores SD3's T5, also under a
    variant's name) load to the same outputs; a missing shard or weight file is one line."""
    from safetensors.numpy import load_file, save_file

    _, arrays, _ = _case("t5_relu", tmp_path)
    single = tmp_path / weights_lib.TRANSFORMERS_WEIGHTS.safetensors
    state = load_file(str(single))
    single.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        weights_lib.load_t5_encoder(tmp_path)
    keys = sorted(state)
    shards = {"model.fp16-00001-of-00002.safetensors": keys[::2],
              "model.fp16-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    index = tmp_path / "model.safetensors.index.fp16.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        k: name for name, names in shards.items() for k in names}}))
    assert weights_lib.weight_file(tmp_path, weights_lib.TRANSFORMERS_WEIGHTS, "fp16") == index
    encoder, params = weights_lib.load_t5_encoder(tmp_path, variant="fp16")
    assert _max_error(encoder.apply({"params": params}, arrays["input_ids"]),
                      arrays["last_hidden_state"]) < 1e-4
    (tmp_path / "model.fp16-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names model.fp16-00002-of-00002.safetensors, "
                                                "which is missing"):
        weights_lib.load_t5_encoder(tmp_path, variant="fp16")
    index.write_text("{}")
    with pytest.raises(ValueError, match="not a readable shard index"):
        weights_lib.load_t5_encoder(tmp_path, variant="fp16")


@pytest.mark.parametrize("field, value", [("feed_forward_proj", "gated-silu"),
                                          ("feed_forward_proj", "gelu-gated"),
                                          ("relative_attention_num_buckets", 2)])
def test_unsupported_config_is_one_line(field, value, tmp_path):
    record, _, _ = _case("t5_gated_gelu", tmp_path)
    config = dict(record["config"], **{field: value})
    (tmp_path / weights_lib.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        weights_lib.load_t5_encoder(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / weights_lib.CONFIG}: {field} {value!r}")


def test_config_follows_transformers():
    gated = t5_lib.T5Config.from_dict({"feed_forward_proj": "gated-gelu",
                                       "dense_act_fn": "relu"})  # derived, as in transformers
    assert (gated.is_gated_act, gated.dense_act_fn) == (True, "gelu_new")
    relu = t5_lib.T5Config.from_dict({"feed_forward_proj": "relu", "unknown_field": 1})
    assert (relu.is_gated_act, relu.dense_act_fn) == (False, "relu")
    assert t5_lib.T5Config.from_dict(gated.to_dict()) == gated


# --- the tokenizer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_reference():
    arrays = np.load(DATA / "t5_tokenizer.npz")
    return (json.loads((DATA / "t5_tokenizer.json").read_text()), arrays["ids"],
            arrays["attention_mask"])


def test_tokenizer_matches_transformers(tokenizer_reference):
    record, ids, mask = tokenizer_reference
    tokenizer = tokenizer_lib.T5Tokenizer.from_directory(DATA / "t5_tokenizer_files")
    assert tokenizer.model_max_length == 16
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    got_ids, got_mask = tokenizer.ids_and_mask(record["texts"], 16)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_mask, mask)
    assert got_ids.dtype == np.int32
    np.testing.assert_array_equal(tokenizer.ids(record["texts"]), ids)
    assert tokenizer.token_ids(record["texts"]) == record["full_ids"]
    for text, tokens in zip(record["texts"], record["tokens"]):
        assert tokenizer.tokenize(text) == tokens
    for row, text in zip(record["full_ids"], record["decoded"]):
        assert tokenizer.decode(row) == text


def test_tokenizer_files_and_tokens_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*: expected tokenizer.json"):
        tokenizer_lib.T5Tokenizer.from_directory(tmp_path)
    (tmp_path / tokenizer_lib.TOKENIZER_FILE).write_bytes(
        (DATA / "t5_tokenizer_files" / tokenizer_lib.TOKENIZER_FILE).read_bytes())
    (tmp_path / tokenizer_lib.CONFIG_FILE).write_text(json.dumps({"pad_token": "<extra_id_0>"}))
    with pytest.raises(ValueError, match="the pad_token '<extra_id_0>' is not in the vocabulary"):
        tokenizer_lib.T5Tokenizer.from_directory(tmp_path)
    (tmp_path / tokenizer_lib.CONFIG_FILE).write_text("{}")
    tokenizer = tokenizer_lib.T5Tokenizer.from_directory(tmp_path)
    assert tokenizer.model_max_length == tokenizer_lib.T5_MAX_LENGTH
    full = tokenizer.token_ids(["a red circle"])[0]
    assert tokenizer.ids(["a red circle"], 4).tolist() == [full[:3] + [tokenizer.eos_token_id]]


def test_a_checkpoint_saved_by_transformers_loads_with_its_outputs(tmp_path):
    """A T5 encoder saved by transformers' own ``save_pretrained`` (PyTorch, the interop extra)
    loads with transformers' hidden states."""
    torch = pytest.importorskip("torch")
    torch_transformers = pytest.importorskip("transformers")

    record = json.loads((DATA / "t5_gated_gelu.json").read_text())
    fields = {k: v for k, v in record["config"].items() if not k.startswith("_")}
    config = torch_transformers.T5Config(**fields)
    torch.manual_seed(0)
    model = torch_transformers.T5EncoderModel(config).eval()
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    encoder, params = weights_lib.load_t5_encoder(tmp_path)
    assert _max_error(encoder.apply({"params": params}, ids), want) < 1e-4


def test_a_variant_index_is_preferred_to_a_plain_single_file(tmp_path):
    names = weights_lib.TRANSFORMERS_WEIGHTS.candidates("fp16")
    assert names.index("model.safetensors.index.fp16.json") < names.index("model.safetensors")
    assert names.index("model.fp16.safetensors") < names.index(
        "model.safetensors.index.fp16.json")
