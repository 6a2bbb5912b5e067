"""Stable Diffusion (latent text-to-image) as a ``Pipeline``: loading from the hub or a directory.

A checkpoint in the diffusers layout has one folder per component::

    unet/          config.json + diffusion_flax_model.msgpack
                   | diffusion_pytorch_model.safetensors | diffusion_pytorch_model.bin
    vae/           config.json + the same weight files
    text_encoder/  config.json + flax_model.msgpack | model.safetensors | pytorch_model.bin
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/     scheduler_config.json
    text_encoder_2/, tokenizer_2/   SDXL only: the second encoder (with its projection)

Stable Diffusion 3 / 3.5 has ``transformer/`` (the MMDiT flow model) instead of ``unet/``, a
flow-matching ``scheduler/``, and three text encoders: ``text_encoder/`` and ``text_encoder_2/``
(CLIPs with projection), ``text_encoder_3/`` (T5, optional: without it the T5 rows of the
context are zeros, as in diffusers) with ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``.
Weights split into shards (``*.safetensors.index.json``) are read shard by shard.

Each component is built from its ``config.json`` as the project's own network
(``vard_jax.models.nn``) and filled from its Flax weights when it has them, else from its
PyTorch weights (``vard_jax.models.nn.weights``: ``.safetensors`` without PyTorch, pickled
``.bin`` only with it). Remote code is never run.

A hub id is resolved to a local snapshot first (only the files named above are fetched, one
weight format per component); without a network, a snapshot already in the Hugging Face cache
is used, else the load fails with one ``FileNotFoundError`` line telling how to proceed.

Parameters are returned as float32 pytrees ``{"unet", "text_encoder", "vae"}``; ``dtype``
sets the modules' computation dtype only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from vard_jax.diffusion.flow import FlowMatchConfig
from vard_jax.diffusion.schedule import NoiseScheduleConfig, ScheduleConfig
from vard_jax.models.nn import clip as nn_clip, mmdit as nn_mmdit, t5 as nn_t5, vae as nn_vae
from vard_jax.models.nn import weights as weights_lib
from vard_jax.models.nn.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightFiles
from vard_jax.models.pipeline import Pipeline, SD3Pipeline, SDXLPipeline
from vard_jax.tokenizer import CLIPTokenizer, T5Tokenizer

#: Stable Diffusion 1.5's ``unet/config.json`` (the fields FlaxUNet2DConditionModel takes):
#: for shape-only analyses (benchmarks, memory) without its weights.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

#: The model used when ``pretrained.path`` is empty (the DDPO/VARD base model).
DEFAULT_MODEL_ID = "CompVis/stable-diffusion-v1-4"

#: The component folders of a diffusers Stable Diffusion checkpoint.
UNET, VAE, TEXT_ENCODER, TOKENIZER, SCHEDULER = ("unet", "vae", "text_encoder", "tokenizer",
                                                 "scheduler")
#: SDXL's second text encoder and tokenizer.
TEXT_ENCODER_2, TOKENIZER_2 = "text_encoder_2", "tokenizer_2"
#: Stable Diffusion 3: the flow transformer and the T5 encoder and tokenizer.
TRANSFORMER, TEXT_ENCODER_3, TOKENIZER_3 = "transformer", "text_encoder_3", "tokenizer_3"
#: scheduler_config.json ``_class_name`` of flow-matching models.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SCHEDULER_CONFIG = "scheduler_config.json"

# --- resolving a hub id or a directory ---------------------------------------------------------

def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``), read at call time."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def weight_patterns(files: Sequence[str], folders: Sequence[str], weights: WeightFiles,
                    variant: str = "") -> list[str]:
    """The one weight file to fetch per folder (``""`` = the repository root), in the order of
    ``WeightFiles.names``; for weights split into shards, the index and every shard it names
    (``<stem>*-of-*.safetensors``)."""
    available = set(files)
    patterns = []
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        for name in weights.candidates(variant):
            if prefix + name in available:
                patterns.append(prefix + name)
                if name in weights.indexes(variant):
                    patterns.append(prefix + weights.shard_pattern(name))
                break
    return patterns


def resolve_pretrained(path: str, revision: str, choose_files: Callable[[list[str]], list[str]],
                       failure: str) -> pathlib.Path:
    """A local directory holding ``path``: the directory itself, or a hub snapshot of it.

    ``choose_files(repository file list) -> allow patterns`` picks what to download.
    Without a network (or with ``HF_HUB_OFFLINE``) a cached snapshot is used. When neither
    works, raises ``FileNotFoundError(failure)``.
    """
    if os.path.isdir(path):
        return pathlib.Path(path)
    import huggingface_hub

    revision_or_none = revision or None
    if not _hub_offline():
        try:
            files = huggingface_hub.list_repo_files(path, revision=revision_or_none)
            snapshot = huggingface_hub.snapshot_download(
                path, revision=revision_or_none, allow_patterns=choose_files(files))
            return pathlib.Path(snapshot)
        except (OSError, ValueError):  # offline, unknown repository or revision, bad id
            pass
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            path, revision=revision_or_none, local_files_only=True))
    except (OSError, ValueError):
        raise FileNotFoundError(failure) from None


def read_schedule(directory: pathlib.Path) -> ScheduleConfig:
    """The training schedule from ``scheduler/scheduler_config.json``: a DDPM noise schedule,
    or a flow-matching one (``FlowMatchEulerDiscreteScheduler``)."""
    file = directory / SCHEDULER / SCHEDULER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no scheduler config at {file}")
    scheduler_config = json.loads(file.read_text())
    if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
        return FlowMatchConfig.from_diffusers(scheduler_config, str(file))
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing != "leading":
        warnings.warn(f"{file}: timestep_spacing {spacing!r} is ignored; this project's DDIM "
                      "sampler uses 'leading' spacing with steps_offset", stacklevel=2)
    return NoiseScheduleConfig.from_diffusers(scheduler_config)


def _load_failure(path: str) -> str:
    return (f"could not load Stable Diffusion from '{path}' (no network or no such model); "
            "download it elsewhere and set --config.pretrained.path=/local/dir")


def _checkpoint_files(files: list[str], variant: str = "") -> list[str]:
    patterns = ["model_index.json", f"{SCHEDULER}/*.json", f"{TOKENIZER}/*", f"{TOKENIZER_2}/*",
                f"{TOKENIZER_3}/*"]
    patterns += [f"{folder}/config.json" for folder in (UNET, TRANSFORMER, VAE, TEXT_ENCODER,
                                                        TEXT_ENCODER_2, TEXT_ENCODER_3)]
    patterns += weight_patterns(files, (UNET, TRANSFORMER, VAE), DIFFUSERS_WEIGHTS, variant)
    patterns += weight_patterns(files, (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3),
                                TRANSFORMERS_WEIGHTS, variant)
    return patterns


def _dtype(dtype: Any) -> Any:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a JAX dtype (float32, bfloat16, "
                         "float16)") from None


def load(path: str = DEFAULT_MODEL_ID, revision: str = "", dtype: Any = "float32",
         variant: str = "", attention: str = "xla", resolution: int = 0
         ) -> tuple[Pipeline, dict]:
    """Loads a Stable Diffusion checkpoint (hub id or local directory): (pipeline, params).

    ``params = {"unet", "text_encoder", "vae"}`` in float32; ``dtype`` is the modules'
    computation dtype. ``revision`` is a hub branch, tag or commit (ignored for directories);
    ``variant`` (e.g. ``"fp16"``) prefers ``<weights>.<variant>.safetensors``; ``attention`` is
    the attention kernel (``vard_jax.models.nn.attention``); ``resolution`` the image side in
    pixels (0: the model's ``sample_size``). ``path = ""`` means ``DEFAULT_MODEL_ID``. For
    Stable Diffusion 3 ``params["unet"]`` holds the transformer's.
    """
    path = path or DEFAULT_MODEL_ID
    root = resolve_pretrained(path, revision, lambda files: _checkpoint_files(files, variant),
                              _load_failure(path))
    compute_dtype = _dtype(dtype)
    if (root / TRANSFORMER).is_dir() and not (root / UNET).is_dir():
        pipeline, params = _sd3(root, compute_dtype, attention, variant)
        return _at_resolution(pipeline, resolution, root), params
    unet, unet_params = weights_lib.load_unet(root / UNET, compute_dtype, attention, variant)
    vae, vae_params = weights_lib.load_vae(root / VAE, compute_dtype, variant)
    text_encoder, text_params = weights_lib.load_clip_text(root / TEXT_ENCODER, compute_dtype,
                                                           attention, variant=variant)
    tokenizer = CLIPTokenizer.from_directory(root / TOKENIZER)
    channels, latent_channels = unet.config.in_channels, vae.config.latent_channels
    if channels != latent_channels:
        raise ValueError(f"{root}: the UNet takes {channels} channels but the VAE's latents have "
                         f"{latent_channels}; only text-to-image UNets are supported")
    sdxl = unet.config.addition_embed_type is not None  # its two encoders are checked below
    if not sdxl and text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"{root}: the text encoder's width {text_encoder.config.hidden_size} is "
                         f"not the UNet's cross_attention_dim {unet.config.cross_attention_dim}")
    size = unet.config.sample_size
    max_length = min(int(tokenizer.model_max_length),
                     text_encoder.config.max_position_embeddings)
    common = dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                  schedule=read_schedule(root), sample_shape=(channels, size, size), vae=vae,
                  vae_scaling_factor=float(vae.config.scaling_factor), max_length=max_length)
    if not sdxl:
        params = {"unet": unet_params, "text_encoder": text_params, "vae": vae_params}
        return _at_resolution(Pipeline(**common), resolution, root), params
    pipeline, params = _sdxl(root, common, text_params, unet_params, vae_params, compute_dtype,
                             attention, variant)
    return _at_resolution(pipeline, resolution, root), params


def _at_resolution(pipeline: Pipeline, resolution: int, root: pathlib.Path) -> Pipeline:
    """The pipeline sampling ``resolution``-pixel images (0: unchanged). SDXL's size ids follow."""
    if not resolution:
        return pipeline
    factor = vae_scale_factor(pipeline) * getattr(pipeline.unet.config, "patch_size", 1)
    if resolution % factor:
        raise ValueError(f"{root}: pretrained.resolution = {resolution} is not a multiple of "
                         f"{factor} (the VAE's factor times the denoiser's patch size)")
    latent = resolution // vae_scale_factor(pipeline)
    table = getattr(pipeline.unet.config, "pos_embed_max_size", None)
    if table and latent // pipeline.unet.config.patch_size > table:
        raise ValueError(f"{root}: pretrained.resolution = {resolution} needs "
                         f"{latent // pipeline.unet.config.patch_size} patches a side; the "
                         f"transformer's position table has {table} (pos_embed_max_size)")
    changes: dict = {"sample_shape": (pipeline.sample_shape[0], latent, latent)}
    if isinstance(pipeline, SDXLPipeline):
        changes["time_ids"] = (resolution, resolution, 0, 0, resolution, resolution)
    return dataclasses.replace(pipeline, **changes)


def _sdxl(root: pathlib.Path, common: dict, text_params: Any, unet_params: Any, vae_params: Any,
          dtype: Any, attention: str, variant: str) -> tuple[SDXLPipeline, dict]:
    """The SDXL pipeline: the second text encoder (with its projection) and tokenizer, checked
    against the UNet's cross-attention width and added-conditioning input."""
    unet, first = common["unet"], common["text_encoder"]
    if not (root / TEXT_ENCODER_2).is_dir():
        raise FileNotFoundError(f"{root}: an SDXL UNet (addition_embed_type 'text_time') needs "
                                f"{TEXT_ENCODER_2}/ and {TOKENIZER_2}/; only the base model's "
                                "two-encoder layout is supported")
    second, second_params = weights_lib.load_clip_text(root / TEXT_ENCODER_2, dtype, attention,
                                                       with_projection=True, variant=variant)
    width = first.config.hidden_size + second.config.hidden_size
    if width != unet.config.cross_attention_dim:
        raise ValueError(f"{root}: the text encoders' widths {first.config.hidden_size} + "
                         f"{second.config.hidden_size} are not the UNet's cross_attention_dim "
                         f"{unet.config.cross_attention_dim}")
    time_ids = 6
    expected = second.config.projection_dim + time_ids * unet.config.addition_time_embed_dim
    if expected != unet.config.projection_class_embeddings_input_dim:
        raise ValueError(f"{root}: projection_class_embeddings_input_dim "
                         f"{unet.config.projection_class_embeddings_input_dim} is not the pooled "
                         f"embedding {second.config.projection_dim} + 6 time ids x "
                         f"{unet.config.addition_time_embed_dim} (a refiner UNet is not supported)")
    if second.config.projection_dim + time_ids > width:
        raise ValueError(f"{root}: the pooled embedding and time ids do not fit one context row")
    pixels = unet.config.sample_size * common["vae"].config.downscale
    pipeline = SDXLPipeline(**common, text_encoder_2=second,
                            tokenizer_2=CLIPTokenizer.from_directory(root / TOKENIZER_2),
                            time_ids=(pixels, pixels, 0, 0, pixels, pixels))
    params = {"unet": unet_params, "text_encoder": {"one": text_params, "two": second_params},
              "vae": vae_params}
    return pipeline, params


def _sd3(root: pathlib.Path, dtype: Any, attention: str,
         variant: str) -> tuple[SD3Pipeline, dict]:
    """Stable Diffusion 3 / 3.5: the MMDiT, the VAE, two CLIPs with projection and the optional
    T5, checked against the transformer's widths."""
    schedule = read_schedule(root)
    if not isinstance(schedule, FlowMatchConfig):
        raise ValueError(f"{root / SCHEDULER / SCHEDULER_CONFIG}: a {TRANSFORMER}/ model needs a "
                         f"flow-matching scheduler ({', '.join(FLOW_SCHEDULERS)})")
    _check_sd3_widths(root)  # from the config files, before any weight is read
    transformer, transformer_params = weights_lib.load_sd3_transformer(
        root / TRANSFORMER, dtype, attention, variant)
    vae, vae_params = weights_lib.load_vae(root / VAE, dtype, variant)
    encoders, text_params = [], {}
    for name, folder in (("one", TEXT_ENCODER), ("two", TEXT_ENCODER_2)):
        encoder, text_params[name] = weights_lib.load_clip_text(
            root / folder, dtype, attention, with_projection=True, variant=variant)
        encoders.append(encoder)
    config = transformer.config
    t5 = tokenizer_3 = None
    if (root / TEXT_ENCODER_3).is_dir():
        t5, text_params["three"] = weights_lib.load_t5_encoder(root / TEXT_ENCODER_3, dtype,
                                                               attention, variant)
        tokenizer_3 = T5Tokenizer.from_directory(root / TOKENIZER_3)
    tokenizer = CLIPTokenizer.from_directory(root / TOKENIZER)
    max_length = min(int(tokenizer.model_max_length),
                     encoders[0].config.max_position_embeddings)
    pipeline = SD3Pipeline(
        unet=transformer, text_encoder=encoders[0], tokenizer=tokenizer, schedule=schedule,
        sample_shape=(config.in_channels, config.sample_size, config.sample_size), vae=vae,
        vae_scaling_factor=float(vae.config.scaling_factor), max_length=max_length,
        text_encoder_2=encoders[1], tokenizer_2=CLIPTokenizer.from_directory(root / TOKENIZER_2),
        text_encoder_3=t5, tokenizer_3=tokenizer_3)
    params = {"unet": transformer_params, "text_encoder": text_params, "vae": vae_params}
    return pipeline, params


def _check_sd3_widths(root: pathlib.Path) -> None:
    """The text encoders' and the VAE's widths against the transformer's, read from their
    ``config.json`` files: one line naming the mismatch."""
    config = weights_lib.module_config
    transformer = config(root / TRANSFORMER, nn_mmdit.MMDiTConfig)
    clips = [config(root / folder, nn_clip.CLIPTextConfig, nested="text_config")
             for folder in (TEXT_ENCODER, TEXT_ENCODER_2)]
    clip_width = sum(c.hidden_size for c in clips)
    pooled = sum(c.projection_dim for c in clips)
    if pooled != transformer.pooled_projection_dim or clip_width > transformer.joint_attention_dim:
        raise ValueError(f"{root}: the CLIP encoders (widths {clip_width}, pooled {pooled}) do not "
                         f"fit the transformer (joint_attention_dim "
                         f"{transformer.joint_attention_dim}, pooled_projection_dim "
                         f"{transformer.pooled_projection_dim})")
    if (root / TEXT_ENCODER_3).is_dir():
        t5 = config(root / TEXT_ENCODER_3, nn_t5.T5Config)
        if t5.d_model != transformer.joint_attention_dim:
            raise ValueError(f"{root}: the T5 encoder's width {t5.d_model} is not the "
                             f"transformer's joint_attention_dim {transformer.joint_attention_dim}")
    vae = config(root / VAE, nn_vae.VAEConfig)
    if vae.latent_channels != transformer.in_channels:
        raise ValueError(f"{root}: the transformer takes {transformer.in_channels} channels but "
                         f"the VAE's latents have {vae.latent_channels}")


def vae_scale_factor(pipeline: Pipeline) -> int:
    """Image pixels per latent pixel (8 for Stable Diffusion): 2 ** (VAE blocks - 1)."""
    return 1 if pipeline.vae is None else pipeline.vae.config.downscale
