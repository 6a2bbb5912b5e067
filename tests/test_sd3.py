"""Stable Diffusion 3 / 3.5 on a tiny random checkpoint in the diffusers layout: loading (MMDiT,
flow scheduler, three text encoders, 16-channel VAE, T5 weights in shards), the packed
context, the resolution option, and two VARD epochs of configs/sd35_pickscore.py."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from tests.test_stable_diffusion import (  # noqa: F401  (clip_dirs is a fixture)
    TEXT_CONFIG, _bang_padded_tokenizer, _check_exports, _random_params, _special_ids,
    _tokenizer, _two_epochs, clip_dirs)
from vard_jax.diffusion import flow
from vard_jax.models import diffusers_export, stable_diffusion as sd
from vard_jax.models.nn import clip as nn_clip, mmdit as nn_mmdit, t5 as nn_t5
from vard_jax.models.nn import vae as nn_vae, weights as weights_lib
from vard_jax.models.pipeline import SD3Pipeline

LATENT = 8
T5_TOKENIZER = (pathlib.Path(__file__).resolve().parent / "reference" / "data"
                / "t5_tokenizer_files")
# Joint width 64 = the two CLIPs (32 + 32) padded; pooled 16 + 16.
TRANSFORMER = dict(sample_size=LATENT, patch_size=2, in_channels=16, out_channels=16,
                   num_layers=2, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32,
                   pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=[0])
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
           block_out_channels=(8, 8, 8, 8), norm_num_groups=8, sample_size=8 * LATENT,
           scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
           use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "shift": 3.0}


def _save_t5_in_shards(directory: pathlib.Path, vocab_size: int, seed: int) -> None:
    """A tiny gated-GELU T5 encoder, its weights split into two safetensors shards + index."""
    config = nn_t5.T5Config(vocab_size=vocab_size, d_model=64, d_kv=8, d_ff=48, num_layers=2,
                            num_heads=4, feed_forward_proj="gated-gelu")
    module = nn_t5.T5EncoderModel(config)
    params = _random_params(lambda: module.init_params(jax.random.PRNGKey(0)), seed)
    state = diffusers_export.torch_state_dict(params)
    weights_lib.save_state_dict(directory, config.to_dict(), state,
                                weights_lib.TRANSFORMERS_WEIGHTS)
    single = directory / weights_lib.TRANSFORMERS_WEIGHTS.safetensors
    from safetensors.numpy import save_file

    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: np.array(state[k], order="C") for k in names}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: name for name, names in shards.items() for k in names}}))
    single.unlink()


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("sd3")
    key = jax.random.PRNGKey(0)
    tokenizer = _tokenizer(root / "tokenizer")
    tokenizer_2 = _bang_padded_tokenizer(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    transformer = nn_mmdit.SD3Transformer2DModel(nn_mmdit.MMDiTConfig.from_dict(TRANSFORMER))
    diffusers_export.save_model(
        transformer, _random_params(lambda: transformer.init_params(key), 20),
        root / "transformer")
    vae = nn_vae.AutoencoderKL(nn_vae.VAEConfig.from_dict(VAE))
    diffusers_export.save_model(vae, _random_params(lambda: vae.init_params(key), 21),
                                root / "vae")
    for folder, tok, act, seed in (("text_encoder", tokenizer, "quick_gelu", 22),
                                   ("text_encoder_2", tokenizer_2, "gelu", 23)):
        config = dict(TEXT_CONFIG, **_special_ids(tok), hidden_act=act, projection_dim=16)
        text = nn_clip.CLIPTextModelWithProjection(nn_clip.CLIPTextConfig.from_dict(config))
        diffusers_export.save_model(text, _random_params(lambda: text.init_params(key), seed),
                                    root / folder)
    shutil.copytree(T5_TOKENIZER, root / "tokenizer_3")
    t5_tokenizer = sd.T5Tokenizer.from_directory(root / "tokenizer_3")
    _save_t5_in_shards(root / "text_encoder_3", len(t5_tokenizer), 24)
    return root


def test_sd3_checkpoint_loads_as_a_flow_pipeline(sd3_checkpoint, tmp_path):
    pipeline, params = sd.load(str(sd3_checkpoint))
    assert isinstance(pipeline, SD3Pipeline)
    assert isinstance(pipeline.schedule, flow.FlowMatchConfig) and pipeline.schedule.shift == 3.0
    assert set(params["text_encoder"]) == {"one", "two", "three"}
    assert pipeline.sample_shape == (16, LATENT, LATENT) and pipeline.image_seq_len == 16
    prompts = ["a red circle", "two blue squares"]
    ids = jnp.asarray(pipeline.tokenize(prompts))
    assert ids.shape == (2, 2 * pipeline.max_length + pipeline.t5_length)
    context = pipeline.encode_ids(params["text_encoder"], ids)
    L = pipeline.max_length
    assert context.shape == (2,) + pipeline.context_shape == (2, L + 256 + 1, 64)
    # Rows: the CLIPs' penultimate states side by side, then T5's states, then the pooled row.
    one = pipeline.text_encoder.apply({"params": params["text_encoder"]["one"]}, ids[:, :L])
    two = pipeline.text_encoder_2.apply({"params": params["text_encoder"]["two"]},
                                        ids[:, L:2 * L])
    np.testing.assert_allclose(context[:, :L, :32], one.penultimate, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(context[:, :L, 32:], two.penultimate, rtol=1e-5, atol=1e-6)
    t5 = pipeline.text_encoder_3.apply({"params": params["text_encoder"]["three"]}, ids[:, 2 * L:])
    np.testing.assert_allclose(context[:, L:-1], t5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(context[:, -1, :32], jnp.concatenate(
        [one.text_embeds, two.text_embeds], -1), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(context[:, -1, 32:]))
    # The velocity depends on the pooled row (the transformer's pooled_projections).
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + pipeline.sample_shape)
    t = jnp.asarray([900.5, 12.25], jnp.float32)
    v = pipeline.eps_fn(params["unet"], x, t, context)
    assert v.shape == x.shape and v.dtype == jnp.float32
    changed = context.at[:, -1, :32].multiply(2.0)
    assert not np.allclose(pipeline.eps_fn(params["unet"], x, t, changed), v, atol=1e-5)
    with pytest.raises(ValueError, match="has none"):
        pipeline.mid_features(params["unet"], x, t, context)

    # Without text_encoder_3/ the T5 rows are L zeros, as in diffusers.
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(sd3_checkpoint, no_t5, ignore=shutil.ignore_patterns("text_encoder_3"))
    pipeline, params = sd.load(str(no_t5))
    ids = jnp.asarray(pipeline.tokenize(["a red circle"]))
    context = pipeline.encode_ids(params["text_encoder"], ids)
    assert context.shape == (1, 2 * L + 1, 64) and not np.any(np.asarray(context[:, L:-1]))

    # Resolution: 32 px -> 4x4 latents (a multiple of 8 x patch 2); 36 px is refused.
    pipeline, _ = sd.load(str(sd3_checkpoint), resolution=32)
    assert pipeline.sample_shape == (16, 4, 4) and pipeline.image_seq_len == 4
    with pytest.raises(ValueError, match="resolution = 36 is not a multiple of 16"):
        sd.load(str(sd3_checkpoint), resolution=36)
    with pytest.raises(ValueError, match="position table has 8"):  # pos_embed_max_size 8
        sd.load(str(sd3_checkpoint), resolution=144)


def test_mismatched_widths_stop_before_any_weight_is_read(sd3_checkpoint, tmp_path):
    # Config files only: the transformer's weights are gone, so a check made after loading
    # would fail on the missing file instead of naming the mismatch.
    root = tmp_path / "mismatched"
    shutil.copytree(sd3_checkpoint, root, ignore=shutil.ignore_patterns("*.safetensors"))
    vae_config = root / "vae" / "config.json"
    vae_config.write_text(json.dumps(dict(json.loads(vae_config.read_text()), latent_channels=4)))
    with pytest.raises(ValueError, match="takes 16 channels but the VAE's latents have 4"):
        sd.load(str(root))
    text_config = root / "text_encoder_2" / "config.json"
    text_config.write_text(json.dumps(dict(json.loads(text_config.read_text()),
                                           projection_dim=8)))
    with pytest.raises(ValueError, match=r"CLIP encoders \(widths 64, pooled 24\) do not fit"):
        sd.load(str(root))


def test_weight_patterns_fetch_every_shard():
    files = ["text_encoder_3/model.safetensors.index.json",
             "text_encoder_3/model-00001-of-00002.safetensors",
             "text_encoder_3/model-00002-of-00002.safetensors",
             "transformer/diffusion_pytorch_model.safetensors"]
    patterns = sd.weight_patterns(files, ("text_encoder_3",), weights_lib.TRANSFORMERS_WEIGHTS)
    assert patterns == ["text_encoder_3/model.safetensors.index.json",
                        "text_encoder_3/model-*-of-*.safetensors"]
    # A variant's shards only (not the plain ones beside them), and before a plain single file.
    variant = files + ["text_encoder_3/model.safetensors",
                       "text_encoder_3/model.safetensors.index.fp16.json",
                       "text_encoder_3/model.fp16-00001-of-00002.safetensors"]
    assert sd.weight_patterns(variant, ("text_encoder_3",), weights_lib.TRANSFORMERS_WEIGHTS,
                              "fp16") == ["text_encoder_3/model.safetensors.index.fp16.json",
                                          "text_encoder_3/model.fp16-*-of-*.safetensors"]
    assert sd.weight_patterns(files, ("transformer",), weights_lib.DIFFUSERS_WEIGHTS) == [
        "transformer/diffusion_pytorch_model.safetensors"]


def test_sd35_config_trains_two_epochs(sd3_checkpoint, clip_dirs, tmp_path):
    """Two VARD epochs of configs/sd35_pickscore.py on the tiny checkpoint (overrides: paths,
    sizes, batches): the flow SDE sampler, LoRA on both streams, the velocity KL."""
    from configs import sd35_pickscore

    config = sd35_pickscore.get_config("tiny")
    assert config.pretrained.path == sd35_pickscore.SD35_MEDIUM
    config.pretrained.resolution = 0  # the tiny model's own 64 px
    loop = _two_epochs(config, sd3_checkpoint, clip_dirs, tmp_path / "run")
    trainer = loop.trainer
    assert isinstance(trainer.schedule, flow.FlowSchedule)
    adapted = {path[-2] for path in flatten_dict(trainer.initial_policy_params())}
    assert {"to_q", "add_q_proj", "to_add_out"} <= adapted
    # The value's x0_hat of a flow model: x - sigma v (the reference's conditional velocity).
    pipeline = trainer.pipeline
    x = jax.random.normal(jax.random.PRNGKey(1), (2,) + pipeline.sample_shape)
    t = trainer.schedule.timesteps[:2]
    context = trainer.encode(pipeline.tokenize(["a red circle", "a blue square"]))
    v = pipeline.eps_fn(trainer.reference_params, x, t, context)
    sigma = (t / 1000.0)[:, None, None, None]
    np.testing.assert_allclose(trainer.reference_x0_hat(trainer.reference_params, x, t, context),
                               x - sigma * v, rtol=1e-5, atol=1e-5)
    # Exports: the LoRA file names the MMDiT's modules transformer.<module> (what
    # StableDiffusion3Pipeline.load_lora_weights reads); the merged export is transformer/.
    _check_exports(tmp_path, config, trainer, loop.final_state.policy_params, "transformer")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "SD3Transformer2DModel.from_pretrained" in card and 'subfolder="transformer"' in card
    assert "StableDiffusion3Pipeline" in (tmp_path / "lora" / "README.md").read_text()
    merged, _ = weights_lib.load_sd3_transformer(tmp_path / "merged" / "transformer")
    assert merged.config == trainer.pipeline.unet.config
