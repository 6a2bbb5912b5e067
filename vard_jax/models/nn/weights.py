"""Reading public checkpoints into the project's networks: one component folder at a time.

A component folder (``unet/``, SD3's ``transformer/``, ``vae/``, ``text_encoder/``, or a CLIP
repository's root) holds ``config.json`` and one weight file, looked for in this order:

========================  ====================================  ======================
kind                      diffusers (UNet, VAE)                  transformers (CLIP)
========================  ====================================  ======================
Flax msgpack              diffusion_flax_model.msgpack           flax_model.msgpack
PyTorch safetensors       diffusion_pytorch_model.safetensors    model.safetensors
PyTorch pickle (opt-in)   diffusion_pytorch_model.bin            pytorch_model.bin
========================  ====================================  ======================

``variant="fp16"`` looks for ``<stem>.fp16.<ext>`` first. Safetensors are read with
``safetensors`` itself (no PyTorch); pickled ``.bin`` files need PyTorch
(``pip install -e ".[pt]"``) and are opened with ``torch.load(weights_only=True)``.

PyTorch tensors become Flax leaves by name (``down_blocks.0.resnets.1.conv1.weight`` ->
``down_blocks_0/resnets_1/conv1/kernel``; CLIP's ``encoder.layers.0`` -> ``encoder/layers/0``)
and layout (conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``, linear ``[out, in]`` ->
``[in, out]``); every leaf of the network must be filled exactly once with its shape.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vard_jax.models.nn import clip as clip_lib
from vard_jax.models.nn import mmdit as mmdit_lib
from vard_jax.models.nn import open_clip
from vard_jax.models.nn import t5 as t5_lib
from vard_jax.models.nn import unet as unet_lib
from vard_jax.models.nn import vae as vae_lib

PT_EXTRA_HINT = 'pip install -e ".[pt]"'
CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    """File names of one component's weights, in order of preference."""

    flax: str
    safetensors: str
    pickle: str

    def names(self, variant: str = "") -> tuple[str, ...]:
        plain = (self.flax, self.safetensors, self.pickle)
        if not variant:
            return plain
        return tuple(_with_variant(n, variant) for n in plain[1:]) + plain

    def indexes(self, variant: str = "") -> tuple[str, ...]:
        """Index files of safetensors split into shards (``<safetensors>.index.json``), the
        variant's first, as diffusers and transformers name them."""
        plain = f"{self.safetensors}.index.json"
        return ((_with_variant(plain, variant),) if variant else ()) + (plain,)

    def candidates(self, variant: str = "") -> tuple[str, ...]:
        """Every weight file name in order of preference: the variant's single files and its
        shard index, then the plain ones."""
        plain = (self.flax, self.safetensors, self.pickle, f"{self.safetensors}.index.json")
        if not variant:
            return plain
        return tuple(_with_variant(n, variant) for n in plain[1:]) + plain

    def shard_pattern(self, index: str) -> str:
        """The shard files of ``index`` (``<stem>[.<variant>]-NNNNN-of-NNNNN.safetensors``)."""
        stem = self.safetensors.rsplit(".", 1)[0]
        variant = index[len(self.safetensors) + len(".index"):-len(".json")]
        return f"{stem}{variant}-*-of-*.safetensors"

    def kind(self, name: str) -> str:
        return {".msgpack": "flax", ".safetensors": "safetensors", ".bin": "pickle"}[
            pathlib.Path(name).suffix]


def _with_variant(name: str, variant: str) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


#: diffusers models (UNet, VAE) and transformers models (CLIP) name their weights differently.
DIFFUSERS_WEIGHTS = WeightFiles("diffusion_flax_model.msgpack",
                                "diffusion_pytorch_model.safetensors",
                                "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = WeightFiles("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")


def weight_file(directory: pathlib.Path, weights: WeightFiles,
                variant: str = "") -> pathlib.Path:
    """The preferred weight file in ``directory``, or the index of its shards
    (FileNotFoundError naming the candidates)."""
    names = weights.candidates(variant)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(names)}")


def shard_files(index: pathlib.Path) -> list[pathlib.Path]:
    """The shard files an ``*.index.json`` names (its ``weight_map``), in order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index}: not a readable shard index ({error})") from None
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def require_torch(what: pathlib.Path) -> None:
    """Raises one ImportError line when PyTorch, needed to read pickled ``what``, is missing."""
    try:
        import torch  # noqa: F401  (only whether it is installed)
    except ImportError:
        raise ImportError(f"{what} holds PyTorch .bin weights, which need PyTorch: "
                          f"{PT_EXTRA_HINT} (or provide .safetensors weights)") from None


def read_state_dict(file: pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict from ``.safetensors`` (host arrays, bfloat16 via ml_dtypes), the
    shards an ``*.index.json`` names, or a pickled ``.bin``."""
    if file.suffix == ".json" and ".index." in file.name:  # <weights>.index[.variant].json
        state: dict[str, np.ndarray] = {}
        for shard in shard_files(file):
            if not shard.is_file():
                raise FileNotFoundError(f"{file} names {shard.name}, which is missing")
            state.update(read_state_dict(shard))
        return state
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(file))
    require_torch(file)
    import torch

    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state.get("state_dict"), dict):  # a training checkpoint (open_clip, HPS)
        state = state["state_dict"]
    return {key: value.float().numpy() if value.is_floating_point() else value.numpy()
            for key, value in state.items() if isinstance(value, torch.Tensor)}


# --- PyTorch names and layouts -> Flax ------------------------------------------------------

_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_INDEX = re.compile(r"^\d+$")


def _paths(pt_key: str) -> list[tuple[str, ...]]:
    """Flax paths a PyTorch key may name: list entries as ``<name>_<index>`` (diffusers) or as
    their own level (transformers' ``layers/0``)."""
    joined: list[str] = []
    for part in pt_key.split("."):
        if _INDEX.match(part) and joined:
            joined[-1] = f"{joined[-1]}_{part}"
        else:
            joined.append(part)
    return [tuple(joined), tuple(pt_key.split("."))]


def _candidates(pt_key: str, tensor: np.ndarray) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """The Flax (path, array) pairs a PyTorch tensor may correspond to, most likely first."""
    for path in _paths(pt_key):
        *prefix, leaf = path
        prefixes = [tuple(prefix)]
        if prefix and prefix[-1] in _ATTENTION_RENAMES:  # the VAE's attention
            prefixes.append(tuple(prefix[:-1]) + (_ATTENTION_RENAMES[prefix[-1]],))
        for base in prefixes:
            if leaf in ("weight", "gamma"):
                if tensor.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
                    yield base + ("kernel",), tensor.transpose(2, 3, 1, 0)
                    if tensor.shape[2:] == (1, 1):  # a 1x1 conv where Flax has a Dense
                        yield base + ("kernel",), tensor[:, :, 0, 0].T
                elif tensor.ndim == 2:  # linear [out, in] -> [in, out]; embedding as is
                    yield base + ("kernel",), tensor.T
                    yield base + ("embedding",), tensor
                yield base + ("scale",), tensor  # group/layer norm
                if leaf == "weight":  # a norm scale under its PyTorch name (T5)
                    yield base + ("weight",), tensor
            elif leaf == "beta":
                yield base + ("bias",), tensor
            else:
                yield base + (leaf,), tensor


#: Buffers some checkpoints carry that are not parameters.
_BUFFERS = re.compile(r"(^|\.)position_ids$")


def convert_state_dict(state: Mapping[str, np.ndarray], target: Any,
                       source: str = "PyTorch weights") -> dict:
    """A PyTorch state dict -> the Flax params of the same network.

    ``target`` is the params tree (arrays or ``jax.ShapeDtypeStruct``); every one of its leaves
    must be filled exactly once with the right shape, and every tensor used, else a
    ``ValueError`` names the first offending keys.
    """
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten_dict(target).items()}
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for pt_key, tensor in state.items():
        if _BUFFERS.search(pt_key):
            continue
        for path, array in _candidates(pt_key, np.asarray(tensor)):
            if shapes.get(path) == array.shape and path not in converted:
                converted[path] = np.array(array, dtype=np.float32, order="C")  # keeps 0-d
                break
        else:
            unused.append(pt_key)
    missing = sorted("/".join(path) for path in shapes if path not in converted)
    if unused or missing:
        raise ValueError(f"{source} do not match the model: {len(unused)} unused "
                         f"({', '.join(unused[:4])}), {len(missing)} missing "
                         f"({', '.join(missing[:4])})")
    return unflatten_dict(converted)


def read_flax(file: pathlib.Path, target: Any,
              keep: Callable[[str], bool] = lambda key: True) -> dict:
    """Flax msgpack weights (the leaves whose dotted path ``keep`` accepts), checked leaf by
    leaf against ``target``."""
    from flax import serialization

    restored = serialization.msgpack_restore(file.read_bytes())
    got = {path: np.asarray(leaf) for path, leaf in flatten_dict(restored).items()
           if keep(".".join(path))}
    want = {path: tuple(leaf.shape) for path, leaf in flatten_dict(target).items()}
    wrong = sorted("/".join(p) for p in set(got) | set(want)
                   if p not in got or p not in want or got[p].shape != want[p])
    if wrong:
        raise ValueError(f"{file} does not match the model: {len(wrong)} parameters differ "
                         f"({', '.join(wrong[:4])})")
    return unflatten_dict(got)


def as_float32(tree: Any) -> Any:
    """Float leaves as float32 device arrays (uncommitted, so they mix with accelerator ones)."""
    def convert(leaf):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        return jnp.asarray(array)

    return jax.tree_util.tree_map(convert, tree)


def read_config(directory: pathlib.Path) -> dict:
    file = directory / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {directory}")
    return json.loads(file.read_text())


def module_config(directory: pathlib.Path, cls: Any, nested: str = "") -> Any:
    """``cls.from_dict`` of ``directory/config.json`` (or of its ``nested`` section where it
    has one, e.g. a whole CLIP's ``text_config``); unsupported fields stop with one line."""
    directory = pathlib.Path(directory)
    raw = read_config(directory)
    return cls.from_dict(raw.get(nested, raw) if nested else raw, str(directory / CONFIG))


def load_params(directory: pathlib.Path, init: Callable[[jax.Array], Any],
                weights: WeightFiles, variant: str = "",
                keep: Callable[[str], bool] = lambda key: True,
                rename: Callable[[dict], dict] = lambda state: state) -> Any:
    """float32 params for the network whose ``init(key) -> params`` gives the target tree.

    ``keep(key)`` selects the PyTorch tensors that belong to it (a text tower read from a
    whole CLIP checkpoint leaves the vision tower's out), after ``rename(state)`` has put the
    PyTorch names in the form the tree expects."""
    target = jax.eval_shape(init, jax.random.PRNGKey(0))
    file = weight_file(directory, weights, variant)
    if file.suffix == ".msgpack":
        return as_float32(read_flax(file, target, keep))
    state = {key: value for key, value in rename(read_state_dict(file)).items() if keep(key)}
    return as_float32(convert_state_dict(state, target, str(file)))


# --- the components -------------------------------------------------------------------------

def load_unet(directory: pathlib.Path, dtype: Any = jnp.float32, implementation: str = "xla",
              variant: str = "") -> tuple[unet_lib.UNet2DConditionModel, Any]:
    config = module_config(directory, unet_lib.UNetConfig)
    module = unet_lib.UNet2DConditionModel(config, dtype=dtype, implementation=implementation)
    return module, load_params(directory, module.init_params, DIFFUSERS_WEIGHTS, variant)


def load_sd3_transformer(directory: pathlib.Path, dtype: Any = jnp.float32,
                         implementation: str = "xla", variant: str = ""
                         ) -> tuple[mmdit_lib.SD3Transformer2DModel, Any]:
    """SD 3 / 3.5's MMDiT from a diffusers ``transformer/`` folder. The position table
    (diffusers' persistent buffer ``pos_embed.pos_embed``) is read like a weight; a checkpoint
    without it gets the sin-cos table diffusers computes."""
    directory = pathlib.Path(directory)
    config = module_config(directory, mmdit_lib.MMDiTConfig)
    module = mmdit_lib.SD3Transformer2DModel(config, dtype=dtype, implementation=implementation)
    target = jax.eval_shape(module.init_params, jax.random.PRNGKey(0))
    file = weight_file(directory, DIFFUSERS_WEIGHTS, variant)
    if file.suffix == ".msgpack":
        return module, as_float32(read_flax(file, target))
    state = dict(read_state_dict(file))
    if mmdit_lib.POSITION_KEY not in state:
        state[mmdit_lib.POSITION_KEY] = np.asarray(mmdit_lib.position_table(config))
    return module, as_float32(convert_state_dict(state, target, str(file)))


def load_vae(directory: pathlib.Path, dtype: Any = jnp.float32,
             variant: str = "") -> tuple[vae_lib.AutoencoderKL, Any]:
    config = module_config(directory, vae_lib.VAEConfig)
    module = vae_lib.AutoencoderKL(config, dtype=dtype)
    return module, load_params(directory, module.init_params, DIFFUSERS_WEIGHTS, variant)


def load_clip_text(directory: pathlib.Path, dtype: Any = jnp.float32, implementation: str = "xla",
                   with_projection: bool = False, variant: str = "") -> tuple[Any, Any]:
    """A CLIP text encoder (``CLIPTextModel``, or ``CLIPTextModelWithProjection``)."""
    config = module_config(directory, clip_lib.CLIPTextConfig, nested="text_config")
    cls = clip_lib.CLIPTextModelWithProjection if with_projection else clip_lib.CLIPTextModel
    module = cls(config, dtype=dtype, implementation=implementation)
    prefixes = ("text_model.", "text_projection.") if with_projection else ("text_model.",)
    return module, load_params(directory, module.init_params, TRANSFORMERS_WEIGHTS, variant,
                               keep=lambda key: key.startswith(prefixes),
                               rename=_text_model_prefix)


def _text_model_prefix(state: dict) -> dict:
    """transformers 5 saves a ``CLIPTextModel`` without its ``text_model.`` prefix (older
    releases, and the hub's checkpoints, keep it): the tower's keys get it back."""
    if any(key.startswith("text_model.") for key in state):
        return state
    tower = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + key if key.startswith(tower) else key): value
            for key, value in state.items()}


#: T5's encoder input embedding, tied to ``shared.weight`` (some checkpoints store both).
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def load_t5_encoder(directory: pathlib.Path, dtype: Any = jnp.float32,
                    implementation: str = "xla", variant: str = ""
                    ) -> tuple[t5_lib.T5EncoderModel, Any]:
    """T5's encoder (SD3's ``text_encoder_3``; a whole T5 checkpoint's decoder is left out).

    ``encoder.embed_tokens.weight`` stands in for ``shared.weight`` where that is missing and is
    dropped otherwise."""
    directory = pathlib.Path(directory)
    config = module_config(directory, t5_lib.T5Config)
    module = t5_lib.T5EncoderModel(config, dtype=dtype, implementation=implementation)
    file = weight_file(directory, TRANSFORMERS_WEIGHTS, variant)
    target = jax.eval_shape(module.init_params, jax.random.PRNGKey(0))
    keep = lambda key: key.startswith(("shared.", "encoder."))  # noqa: E731
    if file.suffix == ".msgpack":
        return module, as_float32(read_flax(file, target, keep))
    state = {key: value for key, value in read_state_dict(file).items() if keep(key)}
    tied = state.pop(T5_TIED_EMBEDDING, None)
    if tied is not None and "shared.weight" not in state:
        state["shared.weight"] = tied
    return module, as_float32(convert_state_dict(state, target, str(file)))


def load_clip(directory: pathlib.Path, dtype: Any = jnp.float32, implementation: str = "xla",
              variant: str = "") -> tuple[clip_lib.CLIPModel, Any]:
    """A whole CLIP (both towers): PickScore, the LAION aesthetic backbone, CLIP score."""
    config = module_config(directory, clip_lib.CLIPConfig)
    module = clip_lib.CLIPModel(config, dtype=dtype, implementation=implementation)
    return module, load_params(directory, module.init_params, TRANSFORMERS_WEIGHTS, variant)


def load_open_clip(file: pathlib.Path, architecture: Mapping[str, Any], dtype: Any = jnp.float32,
                   implementation: str = "xla") -> tuple[clip_lib.CLIPModel, Any]:
    """A CLIP from one open_clip weight file (``.safetensors``, or pickled ``.pt``/``.bin`` with
    the ``pt`` extra) and its open_clip model config (``open_clip.VIT_H_14`` for HPS v2.1)."""
    config = open_clip.clip_config(architecture, str(file))
    module = clip_lib.CLIPModel(config, dtype=dtype, implementation=implementation)
    target = jax.eval_shape(module.init_params, jax.random.PRNGKey(0))
    state = open_clip.to_transformers_names(read_state_dict(file))
    return module, as_float32(convert_state_dict(state, target, str(file)))


def save_state_dict(directory: pathlib.Path, config: Mapping[str, Any],
                    state: Mapping[str, np.ndarray], weights: WeightFiles,
                    variant: str = "") -> pathlib.Path:
    """Writes ``config.json`` and a PyTorch-layout safetensors file (the public format)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    name = _with_variant(weights.safetensors, variant) if variant else weights.safetensors
    save_file({k: np.array(v, order="C") for k, v in state.items()}, str(directory / name))
    return directory / name

