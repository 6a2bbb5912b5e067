"""The project's own UNet, VAE and CLIP against diffusers' and transformers' PyTorch classes.

``tests/reference/data`` holds the PyTorch outputs of tiny random configurations (SD 1.x, SD
2.x and SDXL UNets, an SD and an SD3-style VAE, two CLIPs and a projected text encoder),
written by ``tests/reference/make_reference.py``. Each test writes the same weights as a
PyTorch-layout safetensors checkpoint with its ``config.json``, loads it with the project's
loader and compares the outputs (float32, 1e-4).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import weights as reference_weights
from vard_jax.models.nn import attention as attention_lib
from vard_jax.models.nn import weights as weights_lib

DATA = pathlib.Path(__file__).resolve().parent / "reference" / "data"


def _case(name: str, directory: pathlib.Path, files: weights_lib.WeightFiles,
          variant: str = "") -> tuple[dict, dict]:
    record = json.loads((DATA / f"{name}.json").read_text())
    arrays = dict(np.load(DATA / f"{name}.npz"))
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    weights_lib.save_state_dict(directory, record["config"], state, files, variant)
    return record, arrays


def _close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("name", ["unet_sd1", "unet_sd2", "unet_sdxl"])
def test_unet_matches_diffusers(name, tmp_path):
    _, arrays = _case(name, tmp_path, weights_lib.DIFFUSERS_WEIGHTS)
    unet, params = weights_lib.load_unet(tmp_path)
    added = None
    if "time_ids" in arrays:
        added = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    out = jax.jit(unet.apply)({"params": params}, arrays["sample"], arrays["timesteps"],
                              arrays["context"], added)
    _close(out.sample, arrays["out"])
    assert out.mid.shape[1:] == unet.config.mid_shape(*arrays["sample"].shape[2:])


@pytest.mark.parametrize("name", ["vae_sd", "vae_sd3"])
def test_vae_matches_diffusers(name, tmp_path):
    _, arrays = _case(name, tmp_path, weights_lib.DIFFUSERS_WEIGHTS, variant="fp16")
    vae, params = weights_lib.load_vae(tmp_path, variant="fp16")
    mean, logvar = vae.apply({"params": params}, arrays["images"], method=vae.encode)
    _close(mean, arrays["mean"])
    _close(logvar, arrays["logvar"])
    _close(vae.apply({"params": params}, arrays["latents"], method=vae.decode), arrays["decoded"])


@pytest.mark.parametrize("name", ["clip_legacy_eos", "clip_gelu"])
def test_clip_matches_transformers(name, tmp_path):
    _, arrays = _case(name, tmp_path, weights_lib.TRANSFORMERS_WEIGHTS)
    clip, params = weights_lib.load_clip(tmp_path)
    apply = lambda *a, **k: clip.apply({"params": params}, *a, **k)  # noqa: E731
    _close(apply(arrays["input_ids"], method=clip.get_text_features), arrays["text_features"])
    _close(apply(arrays["input_ids"], arrays["attention_mask"], method=clip.get_text_features),
           arrays["masked_text_features"])
    _close(apply(arrays["pixel_values"], method=clip.get_image_features),
           arrays["image_features"])
    _close(params["logit_scale"], arrays["logit_scale"])


def test_text_encoder_saved_without_its_prefix_loads(tmp_path):
    """transformers 5 writes a CLIPTextModel's keys without ``text_model.``; both forms load to
    the same parameters."""
    record = json.loads((DATA / "clip_gelu.json").read_text())
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    text = {k: v for k, v in state.items() if k.startswith("text_model.")}
    config = record["config"]["text_config"]
    weights_lib.save_state_dict(tmp_path / "prefixed", config, text,
                                weights_lib.TRANSFORMERS_WEIGHTS)
    weights_lib.save_state_dict(tmp_path / "bare", config,
                                {k.removeprefix("text_model."): v for k, v in text.items()},
                                weights_lib.TRANSFORMERS_WEIGHTS)
    _, want = weights_lib.load_clip_text(tmp_path / "prefixed")
    _, got = weights_lib.load_clip_text(tmp_path / "bare")
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_projected_text_encoder_matches_transformers(tmp_path):
    _, arrays = _case("clip_text_projection", tmp_path, weights_lib.TRANSFORMERS_WEIGHTS)
    encoder, params = weights_lib.load_clip_text(tmp_path, with_projection=True)
    out = encoder.apply({"params": params}, arrays["input_ids"])
    _close(out.last_hidden_state, arrays["last_hidden_state"])
    _close(out.penultimate, arrays["penultimate"])
    _close(out.text_embeds, arrays["text_embeds"])
    plain, plain_params = weights_lib.load_clip_text(tmp_path)  # the projection is left out
    assert set(plain_params) == {"text_model"}
    _close(plain.apply({"params": plain_params}, arrays["input_ids"]).last_hidden_state,
           arrays["last_hidden_state"])


def test_weights_that_do_not_fit_name_the_offending_keys(tmp_path):
    record, _ = _case("unet_sd1", tmp_path, weights_lib.DIFFUSERS_WEIGHTS)
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    state.pop("conv_in.bias")
    state["extra.weight"] = np.zeros((2, 2), np.float32)
    weights_lib.save_state_dict(tmp_path, record["config"], state, weights_lib.DIFFUSERS_WEIGHTS)
    with pytest.raises(ValueError, match=r"1 unused \(extra.weight\), 1 missing \(conv_in/bias\)"):
        weights_lib.load_unet(tmp_path)


def test_unsupported_unet_config_is_one_line(tmp_path):
    record = json.loads((DATA / "unet_sd1.json").read_text())
    config = dict(record["config"], class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        weights_lib.unet_lib.UNetConfig.from_dict(config)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_implementations_agree(causal):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (2, 48, 4, 8)) for key in keys[:3])
    mask = jax.random.bernoulli(keys[3], 0.8, (2, 1, 48, 48)).at[..., 0].set(True)
    want = attention_lib.attention(q, k, v, mask=mask, is_causal=causal)
    got = attention_lib.attention(q, k, v, mask=mask, is_causal=causal,
                                  implementation="chunked", query_chunk=16, key_chunk=12)
    np.testing.assert_allclose(got, want, atol=1e-5)
    grad = lambda impl: jax.grad(lambda q: jnp.sum(attention_lib.attention(  # noqa: E731
        q, k, v, is_causal=causal, implementation=impl, query_chunk=16, key_chunk=12) ** 2))(q)
    np.testing.assert_allclose(grad("chunked"), grad("xla"), atol=1e-4)
    with pytest.raises(ValueError, match="use one of xla, cudnn, chunked"):
        attention_lib.attention(q, k, v, implementation="flash")


def test_blocks_remat_keeps_the_gradient_and_finds_the_named_activations(tmp_path):
    """``policy.remat = "blocks"`` saves the activations the UNet names (resnet and transformer
    outputs) and recomputes the rest: the same gradient as without remat."""
    from vard_jax.diffusion import rollout

    _, arrays = _case("unet_sd1", tmp_path, weights_lib.DIFFUSERS_WEIGHTS)
    unet, params = weights_lib.load_unet(tmp_path)

    def loss(params):
        out = unet.apply({"params": params}, arrays["sample"], arrays["timesteps"],
                         arrays["context"])
        return jnp.sum(out.sample ** 2)

    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert "name=resnet" in jaxpr and "name=transformer" in jaxpr and "name=attention" in jaxpr
    plain = jax.grad(loss)(params)
    blocks = jax.grad(jax.checkpoint(loss, policy=rollout.REMAT_POLICIES["blocks"]))(params)
    jax.tree_util.tree_map(_close, blocks, plain)  # float32 recomputation: rounding only


def test_open_clip_checkpoint_matches_open_clip(tmp_path):
    """A tiny OpenCLIP ViT (HPS v2.1's architecture) saved in open_clip's own parameter names
    (query/key/value stacked, [width, embed] projections) gives open_clip's features."""
    from safetensors.numpy import save_file

    record = json.loads((DATA / "open_clip.json").read_text())
    arrays = dict(np.load(DATA / "open_clip.npz"))
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state
    save_file({k: np.array(v, order="C") for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    clip, params = weights_lib.load_open_clip(tmp_path / "m.safetensors", record["config"])
    normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    image = clip.apply({"params": params}, arrays["pixel_values"], method=clip.get_image_features)
    text = clip.apply({"params": params}, arrays["input_ids"], method=clip.get_text_features)
    _close(normalise(np.asarray(image)), arrays["image_features"])
    _close(normalise(np.asarray(text)), arrays["text_features"])
    state["visual.extra"] = np.zeros(3, np.float32)
    save_file({k: np.array(v, order="C") for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"1 unused \(visual.extra\)"):
        weights_lib.load_open_clip(tmp_path / "m.safetensors", record["config"])


@pytest.mark.parametrize("name", ["unet_sd2", "clip_gelu"])
def test_bfloat16_computation_stays_within_bfloat16_tolerance(name, tmp_path):
    """Computing in bfloat16 (float32 weights): the PyTorch reference to bfloat16 precision
    (8 mantissa bits, accumulated over a few layers)."""
    files = weights_lib.DIFFUSERS_WEIGHTS if name.startswith("unet") else (
        weights_lib.TRANSFORMERS_WEIGHTS)
    _, arrays = _case(name, tmp_path, files)
    if name.startswith("unet"):
        unet, params = weights_lib.load_unet(tmp_path, dtype=jnp.bfloat16)
        out = unet.apply({"params": params}, arrays["sample"], arrays["timesteps"],
                         arrays["context"]).sample
        want = arrays["out"]
    else:
        clip, params = weights_lib.load_clip(tmp_path, dtype=jnp.bfloat16)
        out = clip.apply({"params": params}, arrays["pixel_values"],
                         method=clip.get_image_features)
        want = arrays["image_features"]
    assert out.dtype == jnp.bfloat16
    _close(np.asarray(out, np.float32), want, tol=3e-2)
    # and it is not float32: the error is larger than float32 rounding
    assert np.abs(np.asarray(out, np.float32) - want).max() > 1e-4
