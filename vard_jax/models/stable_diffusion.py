"""Stable Diffusion (latent text-to-image) as a ``Pipeline``: loading from the hub or a directory.

A checkpoint in the diffusers layout has one folder per component::

    unet/          config.json + diffusion_flax_model.msgpack
                   | diffusion_pytorch_model.safetensors | diffusion_pytorch_model.bin
    vae/           config.json + the same weight files
    text_encoder/  config.json + flax_model.msgpack | model.safetensors | pytorch_model.bin
    tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/     scheduler_config.json

Each component is read from its Flax weights when it has them. Otherwise its PyTorch weights
are converted: ``.safetensors`` files are read with ``safetensors`` itself (no PyTorch needed);
pickled ``.bin`` files need PyTorch (``pip install -e ".[pt]"``) and are opened with
``torch.load(weights_only=True)``. Remote code is never run.

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
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vard_jax import upstream
from vard_jax.diffusion.schedule import NoiseScheduleConfig
from vard_jax.models.pipeline import Pipeline

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
SCHEDULER_CONFIG = "scheduler_config.json"

PT_EXTRA_HINT = 'pip install -e ".[pt]"'


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    """File names of one component's weights, in order of preference."""

    flax: str
    safetensors: str
    pickle: str

    def names(self) -> tuple[str, str, str]:
        return (self.flax, self.safetensors, self.pickle)


#: diffusers models (UNet, VAE) and transformers models (CLIP) name their weights differently.
DIFFUSERS_WEIGHTS = WeightFiles("diffusion_flax_model.msgpack",
                                "diffusion_pytorch_model.safetensors",
                                "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = WeightFiles("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")


# --- resolving a hub id or a directory ---------------------------------------------------------

def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``), read at call time."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def weight_patterns(files: Sequence[str], folders: Sequence[str],
                    weights: WeightFiles) -> list[str]:
    """The one weight file to fetch per folder (``""`` = the repository root): Flax first."""
    available = set(files)
    patterns = []
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        for name in weights.names():
            if prefix + name in available:
                patterns.append(prefix + name)
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


def weights_format(directory: pathlib.Path, weights: WeightFiles) -> str:
    """``"flax"``, ``"safetensors"`` or ``"pickle"``: the preferred weights in ``directory``."""
    for kind, name in zip(("flax", "safetensors", "pickle"), weights.names()):
        if (directory / name).is_file():
            return kind
    raise FileNotFoundError(f"no weights in {directory}: expected one of "
                            f"{', '.join(weights.names())}")


def require_torch(what: pathlib.Path) -> None:
    """Raises one ImportError line when PyTorch, needed to read pickled ``what``, is missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} holds PyTorch .bin weights, which need PyTorch: "
                          f"{PT_EXTRA_HINT} (or provide .safetensors / Flax weights)") from None


def _read_pickled_state_dict(file: pathlib.Path) -> dict[str, np.ndarray]:
    require_torch(file)
    import torch

    state = torch.load(file, map_location="cpu", weights_only=True)
    return {key: value.float().numpy() if value.is_floating_point() else value.numpy()
            for key, value in state.items()}


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(file))  # host arrays; bfloat16 through ml_dtypes


# --- PyTorch state dicts of diffusers models -> Flax params ------------------------------------

_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_INDEX = re.compile(r"^\d+$")


def _flax_prefix(pt_key: str) -> tuple[str, ...]:
    """A PyTorch key as a Flax path: list entries are named ``<name>_<index>`` in Flax.

    ``"down_blocks.0.resnets.1.conv1.weight"`` -> ``("down_blocks_0", "resnets_1", "conv1",
    "weight")``.
    """
    parts: list[str] = []
    for part in pt_key.split("."):
        if _INDEX.match(part) and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _candidates(pt_key: str, tensor: np.ndarray) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """The Flax (path, array) pairs a PyTorch tensor may correspond to, most likely first."""
    *prefix, leaf = _flax_prefix(pt_key)
    prefixes = [tuple(prefix)]
    if prefix and prefix[-1] in _ATTENTION_RENAMES:
        prefixes.append(tuple(prefix[:-1]) + (_ATTENTION_RENAMES[prefix[-1]],))
    for base in prefixes:
        if leaf in ("weight", "gamma"):
            if tensor.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
                yield base + ("kernel",), tensor.transpose(2, 3, 1, 0)
                if tensor.shape[2:] == (1, 1):  # a 1x1 conv stored where Flax has a Dense
                    yield base + ("kernel",), tensor[:, :, 0, 0].T
            elif tensor.ndim == 2:  # linear [out, in] -> [in, out]
                yield base + ("kernel",), tensor.T
                yield base + ("embedding",), tensor
            yield base + ("scale",), tensor  # group/layer norm
        elif leaf == "beta":
            yield base + ("bias",), tensor
        else:
            yield base + (leaf,), tensor


def convert_diffusers_state_dict(state: Mapping[str, np.ndarray], target: Any) -> dict:
    """A diffusers PyTorch state dict -> the Flax params of the same model.

    ``target`` is the Flax params tree (arrays or ``jax.ShapeDtypeStruct``); every one of its
    leaves must be filled exactly once with the right shape, and every tensor used, else a
    ``ValueError`` names the first offending keys.
    """
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten_dict(target).items()}
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for pt_key, tensor in state.items():
        for path, array in _candidates(pt_key, np.asarray(tensor)):
            if shapes.get(path) == array.shape and path not in converted:
                converted[path] = np.ascontiguousarray(array, dtype=np.float32)
                break
        else:
            unused.append(pt_key)
    missing = sorted(".".join(path) for path in shapes if path not in converted)
    if unused or missing:
        raise ValueError(f"PyTorch weights do not match the model: {len(unused)} unused "
                         f"({', '.join(unused[:4])}), {len(missing)} missing "
                         f"({', '.join(missing[:4])})")
    return unflatten_dict(converted)


# The inverse (Flax params -> PyTorch files): vard_jax/models/diffusers_export.py.


# --- components --------------------------------------------------------------------------------

def _as_float32(tree: Any) -> Any:
    """Float leaves as float32, all on the default device (uncommitted).

    The upstream loaders leave params committed to the CPU; going through the host lets them
    mix with arrays on an accelerator.
    """
    def convert(leaf):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        return jnp.asarray(array)

    return jax.tree_util.tree_map(convert, tree)


def load_diffusers_model(cls: Any, root: pathlib.Path, subfolder: str,
                         dtype: Any) -> tuple[Any, Any]:
    """(module, float32 params) of a diffusers Flax model class from ``root/subfolder``."""
    directory = root / subfolder
    config = cls.load_config(str(root), subfolder=subfolder)
    model = cls.from_config(config, dtype=dtype)
    kind = weights_format(directory, DIFFUSERS_WEIGHTS)
    if kind == "flax":
        _, params = cls.from_pretrained(str(root), subfolder=subfolder, dtype=dtype)
        return model, _as_float32(params)
    if kind == "safetensors":
        state = _read_safetensors(directory / DIFFUSERS_WEIGHTS.safetensors)
    else:
        state = _read_pickled_state_dict(directory / DIFFUSERS_WEIGHTS.pickle)
    target = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    return model, _as_float32(convert_diffusers_state_dict(state, target))


def load_transformers_model(cls: Any, root: pathlib.Path, subfolder: str = "",
                            dtype: Any = jnp.float32) -> tuple[Any, Any]:
    """(module without params, float32 params) of a transformers Flax model class.

    Flax weights are read directly; PyTorch ``model.safetensors`` are converted by
    transformers (no PyTorch needed); ``pytorch_model.bin`` needs PyTorch.
    """
    directory = root / subfolder if subfolder else root
    kind = weights_format(directory, TRANSFORMERS_WEIGHTS)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if kind == "flax":
        module, params = cls.from_pretrained(str(root), _do_init=False, **kwargs)
        return module, _as_float32(params)
    if kind == "pickle":
        require_torch(directory / TRANSFORMERS_WEIGHTS.pickle)
    # Conversion from PyTorch weights needs a model with (random) params to match against.
    loaded = cls.from_pretrained(str(root), from_pt=kind == "pickle", **kwargs)
    module = cls(loaded.config, dtype=dtype, _do_init=False)
    return module, _as_float32(loaded.params)


def read_schedule(directory: pathlib.Path) -> NoiseScheduleConfig:
    """The training noise schedule from ``scheduler/scheduler_config.json``."""
    file = directory / SCHEDULER / SCHEDULER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no scheduler config at {file}")
    scheduler_config = json.loads(file.read_text())
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing != "leading":
        warnings.warn(f"{file}: timestep_spacing {spacing!r} is ignored; this project's DDIM "
                      "sampler uses 'leading' spacing with steps_offset", stacklevel=2)
    return NoiseScheduleConfig.from_diffusers(scheduler_config)


def _load_failure(path: str) -> str:
    return (f"could not load Stable Diffusion from '{path}' (no network or no such model); "
            "download it elsewhere and set --config.pretrained.path=/local/dir")


def _checkpoint_files(files: list[str]) -> list[str]:
    patterns = ["model_index.json", f"{SCHEDULER}/*.json", f"{TOKENIZER}/*"]
    patterns += [f"{folder}/config.json" for folder in (UNET, VAE, TEXT_ENCODER)]
    patterns += weight_patterns(files, (UNET, VAE), DIFFUSERS_WEIGHTS)
    patterns += weight_patterns(files, (TEXT_ENCODER,), TRANSFORMERS_WEIGHTS)
    return patterns


def _dtype(dtype: Any) -> Any:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} is not a JAX dtype (float32, bfloat16, "
                         "float16)") from None


def load(path: str = DEFAULT_MODEL_ID, revision: str = "",
         dtype: Any = "float32") -> tuple[Pipeline, dict]:
    """Loads a Stable Diffusion checkpoint (hub id or local directory): (pipeline, params).

    ``params = {"unet", "text_encoder", "vae"}`` in float32; ``dtype`` is the modules'
    computation dtype. ``revision`` is a hub branch, tag or commit (ignored for directories).
    ``path = ""`` means ``DEFAULT_MODEL_ID``.
    """
    path = path or DEFAULT_MODEL_ID
    root = resolve_pretrained(path, revision, _checkpoint_files, _load_failure(path))
    diffusers, transformers = upstream.diffusers(), upstream.transformers()
    compute_dtype = _dtype(dtype)
    unet, unet_params = load_diffusers_model(diffusers.FlaxUNet2DConditionModel, root, UNET,
                                             compute_dtype)
    vae, vae_params = load_diffusers_model(diffusers.FlaxAutoencoderKL, root, VAE, compute_dtype)
    text_encoder, text_params = load_transformers_model(transformers.FlaxCLIPTextModel, root,
                                                        TEXT_ENCODER, compute_dtype)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root), subfolder=TOKENIZER)
    channels, latent_channels = int(unet.config.in_channels), int(vae.config.latent_channels)
    if channels != latent_channels:
        raise ValueError(f"{root}: the UNet takes {channels} channels but the VAE's latents have "
                         f"{latent_channels}; only text-to-image UNets are supported")
    if int(text_encoder.config.hidden_size) != int(unet.config.cross_attention_dim):
        raise ValueError(f"{root}: the text encoder's width {text_encoder.config.hidden_size} is "
                         f"not the UNet's cross_attention_dim {unet.config.cross_attention_dim}")
    size = int(unet.config.sample_size)
    max_length = min(int(tokenizer.model_max_length),
                     int(text_encoder.config.max_position_embeddings))
    pipeline = Pipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                        schedule=read_schedule(root), sample_shape=(channels, size, size),
                        vae=vae, vae_scaling_factor=float(vae.config.scaling_factor),
                        max_length=max_length)
    params = {"unet": unet_params, "text_encoder": text_params, "vae": vae_params}
    return pipeline, params


def vae_scale_factor(pipeline: Pipeline) -> int:
    """Image pixels per latent pixel (8 for Stable Diffusion): 2 ** (VAE blocks - 1)."""
    if pipeline.vae is None:
        return 1
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
