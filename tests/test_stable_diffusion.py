"""Stable Diffusion loading and the pretrained rewards, on tiny random checkpoints.

Tiny models in the real on-disk layouts (diffusers / transformers: ``config.json`` beside Flax
msgpack or PyTorch safetensors weights) stand in for the hub checkpoints, which cannot be
downloaded here: the loading code is the real one.
"""

import json
import pathlib
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from configs import base
from vard_jax.config import validate
from vard_jax.diffusion import sampler as sampler_lib
from vard_jax.models import clip as clip_lib
from vard_jax.models import loader
from vard_jax.models import stable_diffusion as sd
from vard_jax.models import diffusers_export
from vard_jax.models.nn import clip as nn_clip
from vard_jax.models.nn import unet as nn_unet
from vard_jax.models.nn import vae as nn_vae
from vard_jax.models.nn import weights as weights_lib
from tests.reference import weights as reference_weights
from vard_jax import tokenizer as tokenizer_lib
from vard_jax.rewards import pretrained_rewards, registry
from vard_jax.worlds import tokenizer_files

LATENT_SIZE = 8
UNET_CONFIG = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
                   block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                   cross_attention_dim=32,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# Four blocks, as SD's VAE: images are 8x the latents.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(8, 8, 8, 8), norm_num_groups=8,
                  sample_size=8 * LATENT_SIZE, scaling_factor=0.18215,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=tokenizer_files.MAX_LENGTH)
VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, image_size=16, patch_size=4)
# Stable Diffusion v1's scheduler/scheduler_config.json.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False}
# A processor that differs from CLIP's defaults, so that using it is visible.
PROCESSOR_MEAN, PROCESSOR_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _tokenizer(directory: pathlib.Path):
    """The shapes-world CLIP tokenizer, saved in the transformers layout under ``directory``."""
    tokenizer_files.write_tokenizer_files(directory)
    tokenizer = tokenizer_files.load_tokenizer(directory)
    tokenizer.save(directory)
    return tokenizer


def _save_flax(directory: pathlib.Path, config: dict, params: Any, file_name: str) -> None:
    """A component as the hub's Flax branches hold it: config.json + msgpack weights."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, default=list))
    (directory / file_name).write_bytes(serialization.msgpack_serialize(
        jax.tree_util.tree_map(np.asarray, params)))


def _special_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _random_params(init: Callable[[], Any], seed: int) -> Any:
    """Random params shaped like ``init()``'s, drawn with numpy (no init run: far faster on CPU).

    Kernels are scaled by 1/sqrt(fan-in) and norm scales are near 1, so activations stay O(1).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1])) if name == "kernel" else 1
        std = fan_in ** -0.5 if name == "kernel" else 0.05
        return (std * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init))


def _write_common(root: pathlib.Path):
    tokenizer = _tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    return tokenizer


@pytest.fixture(scope="module")
def flax_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny SD checkpoint with Flax weights (msgpack), as on the hub's Flax branches."""
    root = tmp_path_factory.mktemp("sd_flax")
    tokenizer = _write_common(root)
    key = jax.random.PRNGKey(0)
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(UNET_CONFIG))
    _save_flax(root / "unet", dict(UNET_CONFIG, _class_name="UNet2DConditionModel"),
               _random_params(lambda: unet.init_params(key), 0),
               weights_lib.DIFFUSERS_WEIGHTS.flax)
    vae = nn_vae.AutoencoderKL(nn_vae.VAEConfig.from_dict(VAE_CONFIG))
    _save_flax(root / "vae", dict(VAE_CONFIG, _class_name="AutoencoderKL"),
               _random_params(lambda: vae.init_params(key), 1), weights_lib.DIFFUSERS_WEIGHTS.flax)
    text_config = dict(TEXT_CONFIG, **_special_ids(tokenizer))
    text = nn_clip.CLIPTextModel(nn_clip.CLIPTextConfig.from_dict(text_config))
    _save_flax(root / "text_encoder", text_config,
               _random_params(lambda: text.init_params(key), 2),
               weights_lib.TRANSFORMERS_WEIGHTS.flax)
    return root


@pytest.fixture(scope="module")
def safetensors_checkpoint(flax_checkpoint, tmp_path_factory) -> pathlib.Path:
    """The same tiny checkpoint with the UNet and VAE as PyTorch-layout safetensors (the
    hub's usual format), written by the project's exporter."""
    root = tmp_path_factory.mktemp("sd_safetensors")
    pipeline, params = sd.load(str(flax_checkpoint))
    for sub in ("tokenizer", "scheduler", "text_encoder"):
        shutil.copytree(flax_checkpoint / sub, root / sub)
    diffusers_export.save_model(pipeline.unet, params["unet"], root / "unet")
    diffusers_export.save_model(pipeline.vae, params["vae"], root / "vae")
    return root


def test_safetensors_export_round_trip(flax_checkpoint, safetensors_checkpoint):
    for sub in ("unet", "vae"):
        files = {p.name for p in (safetensors_checkpoint / sub).iterdir()}
        assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
        config = json.loads((safetensors_checkpoint / sub / "config.json").read_text())
        assert config["_class_name"] in ("UNet2DConditionModel", "AutoencoderKL")
    _, params = sd.load(str(flax_checkpoint))
    _, again = sd.load(str(safetensors_checkpoint))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    state = diffusers_export.torch_state_dict(params["unet"])
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in state
    assert "time_embedding.linear_1.weight" in state
    assert state["conv_in.weight"].shape == (32, 4, 3, 3)  # [out, in, kh, kw]


def test_load_flax_checkpoint_and_sample(flax_checkpoint):
    pipeline, params = sd.load(str(flax_checkpoint))
    assert set(params) == {"unet", "text_encoder", "vae"}
    assert pipeline.sample_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert pipeline.is_latent and pipeline.vae_scaling_factor == pytest.approx(0.18215)
    assert pipeline.max_length == tokenizer_files.MAX_LENGTH
    assert sd.vae_scale_factor(pipeline) == 8
    schedule = pipeline.schedule
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    assert schedule.steps_offset == 1 and not schedule.set_alpha_to_one
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))

    spec = sampler_lib.SamplerSpec(num_steps=2, eta=1.0, guidance_scale=3.0)
    ids = jnp.asarray(pipeline.tokenize(["a red circle", "two blue squares"]))
    samples = sampler_lib.jit_sampler(pipeline, spec)(params, params["unet"], ids,
                                                      jax.random.PRNGKey(0))
    images = np.asarray(samples.images)
    size = 8 * LATENT_SIZE
    assert images.shape == (2, size, size, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert samples.trajectory.x0.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)


def test_family_loader(flax_checkpoint):
    config = base.get_config()
    config.pretrained.family = "stable_diffusion"
    config.pretrained.path = str(flax_checkpoint)
    config.reward.path = "/rewards/pickscore"
    validate(config, device_count=1)
    loaded = loader.load(config)
    assert loaded.pipeline.is_latent and set(loaded.params) == {"unet", "text_encoder", "vae"}
    assert loaded.reward_path == "/rewards/pickscore"
    assert loaded.world_clip is None
    config.pretrained.random_init = True
    with pytest.raises(ValueError, match="random_init"):
        loader.load(config)


def test_attention_option_gives_the_same_noise_prediction(flax_checkpoint):
    config = base.get_config()
    config.pretrained.family = "stable_diffusion"
    config.pretrained.path = str(flax_checkpoint)
    plain = loader.load(config)
    config.pretrained.attention = "chunked"
    chunked = loader.load(config)
    assert chunked.pipeline.unet.implementation == "chunked"
    assert chunked.pipeline.text_encoder.implementation == "chunked"
    assert plain.pipeline.unet.implementation == "xla"
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, LATENT_SIZE, LATENT_SIZE))
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
    timesteps = jnp.array([10, 900])
    np.testing.assert_allclose(
        chunked.pipeline.eps_fn(chunked.params["unet"], x, timesteps, context),
        plain.pipeline.eps_fn(plain.params["unet"], x, timesteps, context), atol=1e-4)


def test_unknown_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time by the loader
    model_id = "vard-test-nobody/no-such-stable-diffusion"
    with pytest.raises(FileNotFoundError) as error:
        sd.load(model_id)
    message = str(error.value)
    assert "\n" not in message and f"'{model_id}'" in message
    assert "--config.pretrained.path=/local/dir" in message


def test_pickle_weights_without_torch_name_the_extra(tmp_path, monkeypatch):
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps(
        dict(UNET_CONFIG, _class_name="UNet2DConditionModel")))
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" raises ImportError
    with pytest.raises(ImportError) as error:
        weights_lib.load_unet(unet_dir)
    assert "\n" not in str(error.value) and 'pip install -e ".[pt]"' in str(error.value)


def test_pytorch_checkpoint_matches_torch(tmp_path):
    """PyTorch weights (safetensors, and a pickled .bin) load into Flax with the same outputs."""
    torch = pytest.importorskip("torch")  # the interop extra: torch, diffusers, transformers
    torch_diffusers = pytest.importorskip("diffusers")  # PyTorch classes: reference outputs only
    torch_transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    root = tmp_path / "sd_pt"
    tokenizer = _write_common(root)
    unet = torch_diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = torch_diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    text = torch_transformers.CLIPTextModel(torch_transformers.CLIPTextConfig(
        **TEXT_CONFIG, **_special_ids(tokenizer))).eval()
    with torch.no_grad():  # random (non-zero) values everywhere, also where torch inits zeros
        for module in (unet, vae):
            for parameter in module.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    pipeline, params = sd.load(str(root))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)
    timesteps = np.array([10, 900], np.int32)
    ids = pipeline.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        text_ref = text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
        eps_ref = unet(torch.from_numpy(latents), torch.from_numpy(timesteps), text_ref).sample
        decoded_ref = vae.decode(torch.from_numpy(latents)).sample

    @jax.jit
    def forward(params, ids, latents, timesteps):
        context = pipeline.encode_ids(params["text_encoder"], ids)
        eps = pipeline.eps_fn(params["unet"], latents, timesteps, context)
        decoded = pipeline.vae.apply({"params": params["vae"]}, latents,
                                     method=pipeline.vae.decode)
        return context, eps, decoded

    context, eps, decoded = forward(params, ids, latents, timesteps)
    np.testing.assert_allclose(context, text_ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(eps, eps_ref.numpy(), atol=2e-4)
    np.testing.assert_allclose(decoded, decoded_ref.numpy(), atol=2e-4)

    # The exporter writes PyTorch's own names and layouts.
    for module, flax_params in ((unet, params["unet"]), (vae, params["vae"])):
        exported = diffusers_export.torch_state_dict(flax_params)
        reference = {k: v.numpy() for k, v in module.state_dict().items()}
        assert set(exported) == set(reference)
        for key, value in reference.items():
            np.testing.assert_allclose(exported[key], value, atol=1e-6, err_msg=key)

    # The same UNet as a pickled state dict (read with torch.load(weights_only=True)).
    pickled = tmp_path / "sd_bin"
    unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    _, from_bin = weights_lib.load_unet(pickled / "unet")
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, params["unet"])


def test_lora_export_loads_in_diffusers_pytorch(safetensors_checkpoint, tmp_path):
    """diffusers' PyTorch StableDiffusionPipeline reads our LoRA file with load_lora_weights,
    and its UNet then computes what ours does with the adapters (alpha != rank: the scale is
    folded into lora_B). Needs the ``interop`` extra (torch, peft)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    torch_diffusers = pytest.importorskip("diffusers")
    torch_transformers = pytest.importorskip("transformers")

    from vard_jax.models import lora

    pipeline, params = sd.load(str(safetensors_checkpoint))
    spec = lora.LoraSpec(rank=2, alpha=3.0)
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map(  # B = 0 at init: random values everywhere instead
        lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32),
        lora.init(params["unet"], spec, jax.random.PRNGKey(0)))
    latents = rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)
    timesteps = np.array([10, 900], np.int32)
    context = rng.standard_normal((2, pipeline.max_length, UNET_CONFIG["cross_attention_dim"])
                                  ).astype(np.float32)
    eps = np.asarray(jax.jit(lora.apply_unmerged(pipeline.eps_fn, adapters, spec.scale))(
        params["unet"], latents, timesteps, context))
    base_eps = np.asarray(jax.jit(pipeline.eps_fn)(params["unet"], latents, timesteps, context))
    assert np.abs(eps - base_eps).max() > 1e-2  # the adapters matter
    diffusers_export.save_diffusers_lora(adapters, spec.scale, tmp_path / "lora")

    root = safetensors_checkpoint
    pipe = torch_diffusers.StableDiffusionPipeline(
        vae=torch_diffusers.AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=torch_transformers.CLIPTextModel(torch_transformers.CLIPTextConfig(
            **TEXT_CONFIG)),
        tokenizer=torch_transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        unet=torch_diffusers.UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=torch_diffusers.DDIMScheduler.from_pretrained(root / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # (offline, as the tests run, diffusers needs the file's name; online it finds it)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=diffusers_export.LORA_WEIGHTS)
    with torch.no_grad():
        loaded = pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps.astype(np.int64)),
                           torch.from_numpy(context)).sample.numpy()
    # float32 rounding through the UNet, with adapters of size ~0.2 (outputs up to ~2): the
    # loaded model differs by ~3e-4 at most, while the adapters move eps by ~1.
    np.testing.assert_allclose(loaded, eps, atol=1e-3)


# --- pretrained rewards ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny PickScore-format CLIP (model dir) and its processor dir (tokenizer + processor)."""
    root = tmp_path_factory.mktemp("pickscore")
    processor_dir = root / "processor"
    tokenizer = _tokenizer(processor_dir)
    size = VISION_CONFIG["image_size"]
    (processor_dir / pretrained_rewards.PREPROCESSOR_CONFIG).write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size}, "do_center_crop": True,
        "image_mean": list(PROCESSOR_MEAN), "image_std": list(PROCESSOR_STD)}))
    config = nn_clip.CLIPConfig.from_dict({"text_config": dict(TEXT_CONFIG,
                                                               **_special_ids(tokenizer)),
                                           "vision_config": VISION_CONFIG, "projection_dim": 24})
    model = nn_clip.CLIPModel(config)
    params = _random_params(lambda: model.init_params(jax.random.PRNGKey(0)), 3)
    params["logit_scale"] = np.asarray(np.log(100.0), np.float32)
    diffusers_export.save_model(model, params, root / "model")
    return root / "model", processor_dir


def _images(seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (2, 24, 24, 3))


def test_pickscore_is_finite_differentiable_and_uses_the_processor(clip_dirs):
    model_dir, processor_dir = clip_dirs
    context = registry.RewardContext(path=f"{model_dir}::{processor_dir}")
    reward = registry.build("pickscore", context)
    assert reward.differentiable and reward.jittable and reward.backbone is not None
    prompts = ["a red circle", "two blue squares"]
    ids = reward.prepare(prompts)
    assert ids.shape == (2, tokenizer_files.MAX_LENGTH)
    images = _images()
    model, params, _ = reward.backbone

    @jax.jit
    def scores(images, ids):
        expected = clip_lib.clip_logits(model, params, images, ids, size=16,
                                        mean=PROCESSOR_MEAN, std=PROCESSOR_STD)
        default_preprocessing = clip_lib.clip_logits(model, params, images, ids)
        grad = jax.grad(lambda x: reward.score(x, ids).sum())(images)
        return reward.score(images, ids), expected, default_preprocessing, grad

    values, expected, default_preprocessing, grad = scores(images, jnp.asarray(ids))
    assert values.shape == (2,) and np.isfinite(values).all()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(values, default_preprocessing)
    assert np.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0
    evaluated, _ = registry.RewardEvaluator(reward)(np.asarray(images), prompts)
    np.testing.assert_allclose(evaluated, values, rtol=1e-5, atol=1e-5)


def _aesthetic_head(path: pathlib.Path, embedding_dim: int) -> dict[str, np.ndarray]:
    """Random LAION-layout head weights (PyTorch names and [out, in] shapes) in safetensors."""
    rng = np.random.default_rng(1)
    state, fan_in = {}, embedding_dim
    for width, index in zip(pretrained_rewards.AESTHETIC_WIDTHS,
                            pretrained_rewards.AESTHETIC_LAYER_INDICES):
        state[f"layers.{index}.weight"] = rng.normal(0, fan_in ** -0.5, (width, fan_in)).astype(
            np.float32)
        state[f"layers.{index}.bias"] = rng.normal(0, 0.1, (width,)).astype(np.float32)
        fan_in = width
    save_file(state, str(path))
    return state


def test_aesthetic_equals_the_mlp_of_the_normalised_embedding(clip_dirs, tmp_path):
    model_dir, processor_dir = clip_dirs
    head_file = tmp_path / "head.safetensors"
    state = _aesthetic_head(head_file, embedding_dim=24)
    reward = registry.build("aesthetic", registry.RewardContext(path=f"{model_dir}::{head_file}"))
    assert reward.differentiable and reward.jittable
    images = _images(1)
    prepared = reward.prepare(["x", "y"])
    bundle = pretrained_rewards.load_clip(str(model_dir))

    @jax.jit
    def compute(images):
        pixels = clip_lib.preprocess(images, 16)  # the model dir has no processor: CLIP's
        features = bundle.model.apply({"params": bundle.params}, pixels,
                                      method=bundle.model.get_image_features)
        grad = jax.grad(lambda x: reward.score(x, prepared).sum())(images)
        return reward.score(images, prepared), features, grad

    values, features, grad = (np.asarray(a) for a in compute(images))
    x = features / np.linalg.norm(features, axis=-1, keepdims=True)
    for index in pretrained_rewards.AESTHETIC_LAYER_INDICES:
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(values, x[:, 0], rtol=1e-4, atol=1e-5)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0

    bad = tmp_path / "bad.safetensors"
    save_file({"layers.0.weight": np.zeros((3, 3), np.float32)}, str(bad))
    with pytest.raises(ValueError, match="layers.0.weight of shape"):
        registry.build("aesthetic", registry.RewardContext(path=f"{model_dir}::{bad}"))
    with pytest.raises(ValueError, match="needs its MLP weights"):
        registry.build("aesthetic", registry.RewardContext())
    with pytest.raises(FileNotFoundError, match="is not a .safetensors file"):
        registry.build("aesthetic", registry.RewardContext(path=str(tmp_path / "none.pth")))


def test_weighted_sum_of_pretrained_rewards(clip_dirs, tmp_path):
    model_dir, processor_dir = clip_dirs
    head_file = tmp_path / "head.safetensors"
    _aesthetic_head(head_file, embedding_dim=24)
    path = (f"pickscore={model_dir}::{processor_dir}; aesthetic={model_dir}::{head_file};"
            f"clip_score={model_dir}::{processor_dir}")
    context = registry.RewardContext(path=path)
    total = registry.build("pickscore:1.0,aesthetic:0.1", context)
    assert total.jittable and total.differentiable
    prompts = ["a red circle", "a green star"]
    images = np.asarray(_images(2))
    values, parts = registry.RewardEvaluator(total)(images, prompts)
    np.testing.assert_allclose(values, parts["pickscore"] + 0.1 * parts["aesthetic"], rtol=1e-5)
    clip_score = registry.build("clip_score", context)
    scores, _ = registry.RewardEvaluator(clip_score)(images, prompts)
    np.testing.assert_allclose(scores, parts["pickscore"], rtol=1e-5)  # the same tiny model


def _open_clip_state(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights of an OpenCLIP ViT in open_clip's own names and layouts (query, key and
    value stacked in ``in_proj``; projections as [width, embed])."""
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    vw, tw, patch = vision["width"], text["width"], vision["patch_size"]
    shapes = {"logit_scale": (), "positional_embedding": (text["context_length"], tw),
              "token_embedding.weight": (text["vocab_size"], tw), "text_projection": (tw, embed),
              "ln_final.weight": (tw,), "ln_final.bias": (tw,), "visual.class_embedding": (vw,),
              "visual.positional_embedding": ((vision["image_size"] // patch) ** 2 + 1, vw),
              "visual.conv1.weight": (vw, 3, patch, patch), "visual.proj": (vw, embed)}
    for name in ("ln_pre", "ln_post"):
        shapes.update({f"visual.{name}.weight": (vw,), f"visual.{name}.bias": (vw,)})
    for prefix, width, layers in (("visual.transformer", vw, vision["layers"]),
                                  ("transformer", tw, text["layers"])):
        for i in range(layers):
            block = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
                f"{block}.attn.in_proj_weight": (3 * width, width),
                f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width),
                f"{block}.attn.out_proj.bias": (width,),
                f"{block}.mlp.c_fc.weight": (4 * width, width),
                f"{block}.mlp.c_fc.bias": (4 * width,),
                f"{block}.mlp.c_proj.weight": (width, 4 * width),
                f"{block}.mlp.c_proj.bias": (width,)})
    return reference_weights.state_dict(shapes, seed)


def test_hpsv2_is_the_cosine_of_openclip_embeddings(clip_dirs, tmp_path):
    """HPS v2.1's reward on a tiny OpenCLIP checkpoint in open_clip's names (a directory with
    its open_clip_config.json): the cosine of image and prompt embeddings, differentiable."""
    _, processor_dir = clip_dirs
    tokenizer = tokenizer_files.load_tokenizer(processor_dir)
    config = {"embed_dim": 24,
              "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 8,
                             "patch_size": 4},
              "text_cfg": {"context_length": tokenizer_files.MAX_LENGTH,
                           "vocab_size": len(tokenizer), "width": 32, "heads": 4, "layers": 2}}
    checkpoint = tmp_path / "hps"
    checkpoint.mkdir()
    save_file(_open_clip_state(config, 7), str(checkpoint / "hps_v2.1.safetensors"))
    (checkpoint / pretrained_rewards.OPEN_CLIP_CONFIG).write_text(json.dumps(config))
    reward = registry.build("hpsv2", registry.RewardContext(path=f"{checkpoint}::{processor_dir}"))
    assert reward.differentiable and reward.jittable
    prompts = ["a red circle", "two blue squares"]
    ids = reward.prepare(prompts)
    images = _images(3)
    model, params = weights_lib.load_open_clip(checkpoint / "hps_v2.1.safetensors", config)
    image = clip_lib.image_embeddings(model, params, images, 16, PROCESSOR_MEAN, PROCESSOR_STD)
    text = clip_lib.text_embeddings(model, params, jnp.asarray(ids))
    scores = reward.score(images, jnp.asarray(ids))
    np.testing.assert_allclose(scores, jnp.sum(image * text, axis=-1), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(scores) <= 1.0 + 1e-5)
    grad = jax.grad(lambda x: reward.score(x, jnp.asarray(ids)).sum())(images)
    assert np.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0
    with pytest.raises(FileNotFoundError, match="no OpenCLIP weights in"):
        registry.build("hpsv2", registry.RewardContext(path=f"{tmp_path}::{processor_dir}"))


def test_pretrained_reward_paths():
    assert pretrained_rewards.path_for("", "pickscore") == ""
    assert pretrained_rewards.path_for("/m::/p", "pickscore") == "/m::/p"
    assert pretrained_rewards.path_for("pickscore=/a; aesthetic=/c::/h.safetensors",
                                       "aesthetic") == "/c::/h.safetensors"
    assert pretrained_rewards.path_for("pickscore=/a", "clip_score") == ""
    with pytest.raises(ValueError, match="not 'reward_name=path'"):
        pretrained_rewards.path_for("pickscore=/a;oops", "pickscore")
    for name in ("pickscore", "aesthetic", "clip_score", "hpsv2"):
        assert name in registry.names()


# --- configs/pickscore.py end to end on the tiny checkpoints -----------------------------------

@pytest.mark.parametrize("value_arch", [
    "conv",
    # The config's own value: the policy step then differentiates the VAE decoder and the
    # PickScore vision tower at every step, ~5 min of compiling on 2 CPU cores.
    pytest.param("reward_init", marks=pytest.mark.slow)])
def test_pickscore_config_trains_lora_bf16(safetensors_checkpoint, clip_dirs, tmp_path,
                                               value_arch):
    """VARD epochs of configs/pickscore.py (LoRA, bfloat16, the PickScore reward on the host,
    its reward-initialised value or the conv value), overriding only paths, sizes and batches
    (one epoch after the value pre-training: the compiles are the cost on CPU); only the LoRA
    adapters train."""
    from configs import pickscore
    from vard_jax.models import lora
    from vard_jax.training.loop import Loop

    model_dir, processor_dir = clip_dirs
    config = pickscore.get_config("tiny")
    assert config.value.arch == "reward_init"
    config.value.arch = value_arch
    config.pretrained.path = str(safetensors_checkpoint)
    config.reward.path = f"{model_dir}::{processor_dir}"
    config.sample.num_steps = 2
    config.train.epochs = config.train.eval_every = 1
    config.policy.scan_unroll = 1  # see tests/tiny_runs.py: UNROLL
    validate(config, device_count=1)
    loop = Loop(config, tmp_path / "run")
    trainer = loop.trainer
    assert trainer.pipeline.is_latent and trainer.value_model.name == value_arch
    reference_before = jax.tree_util.tree_map(np.asarray, trainer.reference_params)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(trainer.reference_params)} == {
        jnp.dtype(jnp.bfloat16)}
    rows = loop.run()

    assert [row["step"] for row in rows] == [0, 1]
    for key in ("reward_mean", "value_loss", "policy_loss", "policy_grad_norm"):
        assert np.isfinite(rows[1][key]), key
    assert np.isfinite(rows[0]["pretrain_value_loss"]) and np.isfinite(rows[1]["eval_reward_mean"])
    assert rows[1]["eval_eps_distance"] > rows[0]["eval_eps_distance"]  # the update moved it

    state = loop.final_state
    adapters = state.policy_params
    layers = lora.target_layers(trainer.reference_params, lora.ATTENTION_TARGETS)
    assert set(flatten_dict(adapters)) == {p + (n,) for p in layers for n in ("a", "b")}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(adapters))
    assert any(np.any(np.asarray(leaf)) for path, leaf in flatten_dict(adapters).items()
               if path[-1] == "b")  # trained away from B = 0
    # Optimiser state exists for the adapters only: its largest leaf is an adapter's size.
    adapter_sizes = {leaf.size for leaf in jax.tree_util.tree_leaves(adapters)}
    opt_sizes = {leaf.size for leaf in jax.tree_util.tree_leaves(state.policy_opt_state)}
    assert max(opt_sizes) <= max(adapter_sizes)
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.policy_opt_state)) < (
        3 * lora.count(adapters))
    # The pretrained UNet is untouched (the policy shares it as its base).
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           jax.tree_util.tree_map(np.asarray, trainer.reference_params),
                           reference_before)
    _check_exports(tmp_path, config, trainer, adapters)


def _save_unet_and_vae(root: pathlib.Path, unet_config: dict, seed: int) -> None:
    """Random UNet and VAE of these configs in the PyTorch layout under ``root``."""
    key = jax.random.PRNGKey(0)
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(unet_config))
    diffusers_export.save_model(unet, _random_params(lambda: unet.init_params(key), seed),
                                root / "unet")
    vae = nn_vae.AutoencoderKL(nn_vae.VAEConfig.from_dict(VAE_CONFIG))
    diffusers_export.save_model(vae, _random_params(lambda: vae.init_params(key), seed + 1),
                                root / "vae")


def _bang_padded_tokenizer(directory: pathlib.Path) -> tokenizer_lib.CLIPTokenizer:
    """The shapes vocabulary plus "!", which pads (as SD 2.x's and SDXL's second tokenizer)."""
    tokenizer_files.write_tokenizer_files(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab["!"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": tokenizer_files.MAX_LENGTH, "pad_token": "!"}))
    return tokenizer_lib.CLIPTokenizer.from_directory(directory)


def _two_epochs(config, checkpoint: pathlib.Path, clip_dirs, workdir: pathlib.Path):
    """Loop rows of two VARD epochs of a Stable Diffusion config on a tiny checkpoint (the
    conv value: the reward-initialised one compiles for minutes on CPU), checked finite."""
    from vard_jax.training.loop import Loop

    model_dir, processor_dir = clip_dirs
    config.pretrained.path = str(checkpoint)
    config.reward.path = f"{model_dir}::{processor_dir}"
    config.value.arch = "conv"
    config.value.pretrain_epochs = 1
    config.sample.num_steps = 2
    config.train.epochs = config.train.eval_every = 2
    config.policy.scan_unroll = 1
    validate(config, device_count=1)
    loop = Loop(config, workdir)
    rows = loop.run()
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        for key in ("reward_mean", "value_loss", "policy_loss", "policy_grad_norm"):
            assert np.isfinite(row[key]), key
    assert rows[2]["eval_eps_distance"] > rows[0]["eval_eps_distance"]
    return loop


@pytest.fixture(scope="module")
def sd2_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny Stable Diffusion 2.x checkpoint (PyTorch-layout safetensors): linear projections
    around attention, heads per block, a gelu text encoder, v-prediction, "!" padding."""
    root = tmp_path_factory.mktemp("sd2")
    tokenizer = _bang_padded_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        dict(SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")))
    key = jax.random.PRNGKey(0)
    unet_config = dict(UNET_CONFIG, use_linear_projection=True, attention_head_dim=[2, 4],
                       upcast_attention=True,
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    _save_unet_and_vae(root, unet_config, seed=4)
    text_config = dict(TEXT_CONFIG, **_special_ids(tokenizer), hidden_act="gelu")
    text = nn_clip.CLIPTextModel(nn_clip.CLIPTextConfig.from_dict(text_config))
    diffusers_export.save_model(text, _random_params(lambda: text.init_params(key), 6),
                                root / "text_encoder")
    return root


def test_sd2_config_trains_two_epochs_with_v_prediction(sd2_checkpoint, clip_dirs, tmp_path):
    """Two VARD epochs of configs/sd2_pickscore.py on a tiny SD 2.x checkpoint (overrides:
    paths, sizes, batches); what is SD 2.x about it comes from the checkpoint."""
    from configs import sd2_pickscore

    config = sd2_pickscore.get_config("tiny")
    assert config.pretrained.path == sd2_pickscore.SD21
    loop = _two_epochs(config, sd2_checkpoint, clip_dirs, tmp_path / "run")
    pipeline = loop.trainer.pipeline
    assert pipeline.schedule.prediction_type == "v_prediction"
    assert pipeline.unet.config.use_linear_projection and pipeline.unet.config.heads == (2, 4)
    ids = pipeline.tokenize(["a red circle"])
    tokenizer = pipeline.tokenizer
    assert ids[0, -1] == tokenizer.pad_token_id != tokenizer.eos_token_id  # "!" pads
    # The values' one-step prediction reads the output as v: x0 = sqrt(a) x - sqrt(1 - a) v.
    trainer = loop.trainer
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + pipeline.sample_shape)
    t = jnp.array([10, 900])
    context = trainer.encode(pipeline.tokenize(["a red circle", "a blue square"]))
    v = pipeline.eps_fn(trainer.reference_params, x, t, context)
    a = jnp.asarray(trainer.schedule.alphas_cumprod)[t][:, None, None, None]
    np.testing.assert_allclose(trainer.reference_x0_hat(trainer.reference_params, x, t, context),
                               jnp.sqrt(a) * x - jnp.sqrt(1.0 - a) * v, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny SDXL checkpoint (PyTorch-layout safetensors): added time/text conditioning,
    transformer depth per block, a second text encoder with a projection and "!" padding."""
    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = _write_common(root)
    tokenizer_2 = _bang_padded_tokenizer(root / "tokenizer_2")
    key = jax.random.PRNGKey(0)
    unet_config = dict(UNET_CONFIG, cross_attention_dim=64, use_linear_projection=True,
                       attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=16 + 6 * 8,
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    _save_unet_and_vae(root, unet_config, seed=8)
    text_config = dict(TEXT_CONFIG, **_special_ids(tokenizer))
    for folder, cls, config, seed in (
            ("text_encoder", nn_clip.CLIPTextModel, text_config, 10),
            ("text_encoder_2", nn_clip.CLIPTextModelWithProjection,
             dict(text_config, vocab_size=len(tokenizer_2), hidden_act="gelu",
                  projection_dim=16), 11)):
        text = cls(nn_clip.CLIPTextConfig.from_dict(config))
        diffusers_export.save_model(text, _random_params(lambda: text.init_params(key), seed),
                                    root / folder)
    return root


def test_sdxl_config_trains_two_epochs(sdxl_checkpoint, clip_dirs, tmp_path):
    """Two VARD epochs of configs/sdxl_pickscore.py on a tiny SDXL checkpoint (overrides:
    paths, sizes, batches); the pooled embedding and the size/crop ids reach the UNet."""
    from configs import sdxl_pickscore
    from vard_jax.models.pipeline import SDXLPipeline

    pipeline, params = sd.load(str(sdxl_checkpoint))
    assert isinstance(pipeline, SDXLPipeline) and set(params["text_encoder"]) == {"one", "two"}
    assert pipeline.time_ids == (64, 64, 0, 0, 64, 64)  # 8 latents x 8 pixels
    ids = jnp.asarray(pipeline.tokenize(["a red circle", "two blue squares"]))
    assert ids.shape == (2, 2 * pipeline.max_length)
    assert ids[0, -1] == pipeline.tokenizer_2.pad_token_id != pipeline.tokenizer.pad_token_id
    context = pipeline.encode_ids(params["text_encoder"], ids)
    assert context.shape == (2,) + pipeline.context_shape == (2, pipeline.max_length + 1, 64)
    hidden, added = pipeline.split_context(context)
    np.testing.assert_array_equal(added["time_ids"], np.tile([64, 64, 0, 0, 64, 64], (2, 1)))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, LATENT_SIZE, LATENT_SIZE))
    t = jnp.array([10, 900])
    eps = pipeline.eps_fn(params["unet"], x, t, context)
    changed = context.at[:, -1, 16:22].set(jnp.asarray([128, 128, 0, 0, 128, 128.0]))
    assert not np.allclose(pipeline.eps_fn(params["unet"], x, t, changed), eps, atol=1e-4)

    config = sdxl_pickscore.get_config("tiny")
    assert config.pretrained.path == sdxl_pickscore.SDXL
    _two_epochs(config, sdxl_checkpoint, clip_dirs, tmp_path / "run")


def _check_exports(tmp_path, config, trainer, adapters, denoiser="unet"):
    """``vard_jax.export`` of the LoRA run: the adapters as diffusers' LoRA file (by default)
    and the merged UNet (``denoiser``: its diffusers name, ``transformer`` for SD 3's MMDiT);
    the LoRA file's W + B A is the merged export's weight."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from vard_jax import export
    from vard_jax.models import lora

    targets = lora.parse_targets(config.policy.lora_targets)
    summary = export.export(tmp_path / "run", tmp_path / "lora")
    assert summary["format"] == "lora" and summary["step"] == config.train.epochs
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", diffusers_export.LORA_WEIGHTS, "vard_config.json"]
    with safe_open(tmp_path / "lora" / diffusers_export.LORA_WEIGHTS, "numpy") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = json.loads(f.metadata()[diffusers_export.LORA_METADATA_KEY])
    rank = config.policy.lora_rank
    assert metadata[f"{denoiser}.r"] == metadata[f"{denoiser}.lora_alpha"] == rank
    modules = sorted(metadata[f"{denoiser}.target_modules"])
    assert len(modules) == len(lora.target_layers(trainer.reference_params,
                                                  targets))
    assert set(tensors) == {f"{denoiser}.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}

    merged = export.export(tmp_path / "run", tmp_path / "merged", fmt="merged")
    assert merged["format"] == "merged"
    with safe_open(tmp_path / "merged" / denoiser / "diffusion_pytorch_model.safetensors",
                   "numpy") as f:
        unet = {key: f.get_tensor(key) for key in f.keys()}
    # The base weights as stored (float32), not the run's bfloat16 copy of them.
    base = load_file(pathlib.Path(config.pretrained.path) / denoiser / "diffusion_pytorch_model"
                     ".safetensors")
    assert set(unet) == set(base)
    for module in modules:
        a, b = (tensors[f"{denoiser}.{module}.lora_{ab}.weight"] for ab in "AB")
        assert a.shape[0] == b.shape[1] == rank
        np.testing.assert_allclose(unet[f"{module}.weight"], base[f"{module}.weight"] + b @ a,
                                   rtol=1e-5, atol=1e-6)
    assert any(np.any(tensors[f"{denoiser}.{m}.lora_B.weight"]) for m in modules)
    untouched = "conv_in.weight" if denoiser == "unet" else "proj_out.weight"
    np.testing.assert_array_equal(unet[untouched], base[untouched])
    scale = config.policy.lora_alpha / rank if config.policy.lora_alpha else 1.0
    some = sorted(lora.target_layers(trainer.reference_params, targets))[0]
    adapter = adapters
    for part in some:
        adapter = adapter[part]
    np.testing.assert_allclose(tensors[f"{denoiser}.{diffusers_export.pt_module_name(some)}"
                                       ".lora_B.weight"], scale * np.asarray(adapter["b"]).T,
                               rtol=1e-6)

    card = (tmp_path / "lora" / "README.md").read_text()
    assert "load_lora_weights" in card and f"| policy.lora_rank | {rank} |" in card
    assert "| pickscore, held-out prompts |" in card and "| pickscore, training prompts |" in card
    saved = json.loads((tmp_path / "lora" / "vard_config.json").read_text())
    assert saved["policy"]["lora_rank"] == rank
    # An export never overwrites: a directory that is not empty is refused with one line.
    with pytest.raises(export.ExportError, match="exists and is not an empty directory"):
        export.export(tmp_path / "run", tmp_path / "lora")


@pytest.mark.parametrize("config_file, model_id", [
    ("pickscore", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sd2_pickscore", "stabilityai/stable-diffusion-2-1"),
    ("sdxl_pickscore", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("sd35_pickscore", "stabilityai/stable-diffusion-3.5-medium")])
def test_pickscore_config_offline_is_one_line(tmp_path, config_file, model_id):
    """Without network or weights, the headline command stops at once, naming the model id
    and the config field that points at a local directory."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "vard_jax.main", f"--config=configs/{config_file}.py",
         f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=120,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"'{model_id}'" in lines[0]
    assert "--config.pretrained.path=/local/dir" in lines[0]
