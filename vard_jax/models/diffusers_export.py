"""Flax params and LoRA adapters -> the files diffusers and transformers (PyTorch) load.

Two formats, both safetensors, readable without PyTorch on our side:

* a network in the PyTorch layout (``save_model``): a UNet or VAE as diffusers writes it
  (``config.json`` and ``diffusion_pytorch_model.safetensors``), a CLIP as transformers does
  (``config.json`` and ``model.safetensors``);
* LoRA adapters as ``pytorch_lora_weights.safetensors``, the file that
  ``pipeline.load_lora_weights(directory)`` reads (``save_diffusers_lora``): PEFT names
  ``unet.<module>.lora_A.weight`` [r, in] and ``unet.<module>.lora_B.weight`` [out, r]
  (``transformer.<module>...`` for SD 3's MMDiT, ``denoiser_name``), and the
  adapter's ``LoraConfig`` (rank, alpha, target modules) in the file's metadata, as diffusers'
  own ``save_lora_weights`` writes it.

Names: Flax names the entries of a module list ``<name>_<index>`` (``down_blocks_0``), PyTorch
``<name>.<index>``; the attention output projection ``to_out_0`` is ``to_out.0``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from vard_jax.models.nn import clip as clip_lib
from vard_jax.models.nn import weights as weights_lib

#: Module lists of diffusers models: Flax names their entries ``<name>_<index>``.
_MODULE_LISTS = frozenset({"down_blocks", "up_blocks", "resnets", "attentions",
                           "transformer_blocks", "downsamplers", "upsamplers", "to_out", "net"})
#: Flax attention projections named otherwise in PyTorch (the Flax UNet's own names are kept).
_PT_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

#: The LoRA file name diffusers' ``load_lora_weights`` looks for in a directory.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: The safetensors metadata key that holds the adapter's ``LoraConfig`` (diffusers >= 0.34).
LORA_METADATA_KEY = "lora_adapter_metadata"


def pt_module_name(path: tuple[str, ...]) -> str:
    """A Flax module path as a PyTorch module name.

    ``("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0")`` ->
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"``.
    """
    parts: list[str] = []
    for part in path:
        name, _, index = part.rpartition("_")
        if name in _MODULE_LISTS and index.isdigit():
            parts += [name, index]
        else:
            parts.append(_PT_NAMES.get(part, part))
    return ".".join(parts)


def torch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """The params of a network as its PyTorch state dict (names and layouts).

    The inverse of ``vard_jax.models.nn.weights.convert_state_dict``: conv kernels
    [kh, kw, in, out] -> [out, in, kh, kw], dense kernels [in, out] -> [out, in], norm scales
    and embeddings -> ``weight``. Float32 numpy arrays.
    """
    state = {}
    for path, leaf in flatten_dict(params).items():
        array = np.asarray(leaf, np.float32)
        *prefix, name = path
        if name == "kernel":
            array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
            name = "weight"
        elif name in ("scale", "embedding"):
            name = "weight"
        state[".".join(filter(None, (pt_module_name(tuple(prefix)), name)))] = array
    return state


def save_model(module: Any, params: Any, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes a network in the PyTorch layout its library reads: a UNet or VAE as diffusers'
    ``from_pretrained`` reads it, a CLIP as transformers' does; ``stable_diffusion.load`` reads
    both. A LoRA policy is merged first (``PolicyModel.merged``)."""
    directory = pathlib.Path(directory)
    config = module.config.to_dict()
    if isinstance(module, clip_lib.CLIPModel):
        files = weights_lib.TRANSFORMERS_WEIGHTS
    elif isinstance(module, (clip_lib.CLIPTextModel, clip_lib.CLIPTextModelWithProjection)):
        files = weights_lib.TRANSFORMERS_WEIGHTS
        config.update(model_type="clip_text_model", architectures=[type(module).__name__])
    else:
        files = weights_lib.DIFFUSERS_WEIGHTS
        config["_class_name"] = type(module).__name__
    weights_lib.save_state_dict(directory, config, torch_state_dict(params), files)
    return directory


def denoiser_name(params: Any) -> str:
    """The diffusers pipeline's name for the network of these params or LoRA adapters:
    ``transformer`` for an MMDiT (SD 3 / 3.5), ``unet`` for a UNet. It is the folder of a
    merged export and the prefix of a LoRA file's keys."""
    mmdit = ("transformer_blocks_", "context_embedder", "time_text_embed", "pos_embed",
             "norm_out", "proj_out")  # top-level names of an MMDiT that no UNet has
    return "transformer" if any(str(k).startswith(mmdit) for k in params) else "unet"


def _adapters_by_module(adapters: Any) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    modules: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, leaf in flatten_dict(adapters).items():
        modules.setdefault(tuple(path[:-1]), {})[path[-1]] = np.asarray(leaf, np.float32)
    for path, pair in modules.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"LoRA adapter {'/'.join(path)} has leaves {sorted(pair)}, "
                             "expected 'a' and 'b'")
    return modules


def lora_state_dict(adapters: Any, scale: float, prefix: str = "unet"
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """LoRA adapters ``{module path: {"a": [in, r], "b": [r, out]}}`` (update ``scale * a @ b``)
    as PEFT tensors and the ``LoraConfig`` fields that describe them.

    The scale is folded into ``lora_B`` and the config says ``lora_alpha = r``: every loader
    (diffusers with or without the metadata, PEFT, ComfyUI, which assume alpha = r when it is
    not given) then applies exactly the trained update ``W + scale * A B``.
    """
    modules = _adapters_by_module(adapters)
    if not modules:
        raise ValueError("no LoRA adapters to export (a full fine-tuning run: export the merged "
                         "UNet instead)")
    ranks = {pair["a"].shape[1] for pair in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters of several ranks {sorted(ranks)}")
    rank = ranks.pop()
    tensors, names = {}, []
    for path, pair in sorted(modules.items()):
        name = pt_module_name(path)
        names.append(name)
        tensors[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(pair["a"].T)
        tensors[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(
            (float(scale) * pair["b"]).T)
    config = {"r": int(rank), "lora_alpha": int(rank), "target_modules": names,
              "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
              "lora_bias": False, "use_dora": False, "use_rslora": False,
              "init_lora_weights": True}
    return tensors, config


def save_diffusers_lora(adapters: Any, scale: float, directory: str | pathlib.Path,
                        prefix: str = "unet") -> pathlib.Path:
    """Writes ``directory/pytorch_lora_weights.safetensors`` (see ``lora_state_dict``) with the
    ``LoraConfig`` in its metadata under ``lora_adapter_metadata`` (keys ``unet.r``, ...);
    returns the file's path."""
    from safetensors.numpy import save_file

    tensors, config = lora_state_dict(adapters, scale, prefix)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(
        {f"{prefix}.{key}": value for key, value in config.items()}, indent=2, sort_keys=True)}
    path = directory / LORA_WEIGHTS
    save_file(tensors, str(path), metadata=metadata)
    return path
