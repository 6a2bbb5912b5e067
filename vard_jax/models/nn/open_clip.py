"""OpenCLIP checkpoints (open_clip's parameter names) as the project's ``CLIPModel``.

open_clip names a CLIP ``visual.conv1``, ``visual.transformer.resblocks.<i>.attn.in_proj_weight``
(query, key and value stacked), ``mlp.c_fc`` / ``mlp.c_proj``, ``ln_final``, ``text_projection``
(a ``[width, embed]`` matrix) ...; ``to_transformers_names`` renames such a state dict into the
names and layouts transformers uses for the same network, which ``weights.convert_state_dict``
then reads. Its architecture comes from open_clip's model config JSON (``embed_dim``,
``vision_cfg``, ``text_cfg``); ``VIT_H_14`` is the one of HPS v2.1 and PickScore's backbone.
Text is pooled at the end-of-text token, the largest id (open_clip's ``argmax`` pooling).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vard_jax.models.nn import clip as clip_lib

#: open_clip's ``ViT-H-14.json``.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                 "layers": 24},
}


def clip_config(config: Mapping[str, Any], source: str = "open_clip config") -> clip_lib.CLIPConfig:
    """The ``CLIPConfig`` of an open_clip model config (standard ViT towers, GELU unless
    ``quick_gelu``)."""
    vision, text = dict(config.get("vision_cfg", {})), dict(config.get("text_cfg", {}))
    for name, part in (("vision_cfg", vision), ("text_cfg", text)):
        for key in ("hf_model_name", "timm_model_name"):
            if part.get(key):
                raise ValueError(f"{source}: {name}.{key} towers are not supported (ViT and "
                                 "transformer towers only)")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    vocab = int(text.get("vocab_size", 49408))
    text_width = int(text.get("width", 512))
    return clip_lib.CLIPConfig(
        text_config=clip_lib.CLIPTextConfig(
            vocab_size=vocab, hidden_size=text_width,
            intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(text.get("layers", 12)),
            num_attention_heads=int(text.get("heads", 8)),
            max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
        vision_config=clip_lib.CLIPVisionConfig(
            hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(vision.get("layers", 12)),
            num_attention_heads=width // head_width, image_size=int(vision.get("image_size", 224)),
            patch_size=int(vision.get("patch_size", 16)), hidden_act=act),
        projection_dim=int(config.get("embed_dim", 512)))


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
#: ``x @ proj`` matrices [width, embed], stored transposed by transformers.
_PROJECTIONS = {"visual.proj": "visual_projection.weight",
                "text_projection": "text_projection.weight"}


def to_transformers_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An open_clip state dict in transformers' CLIP names and layouts. Unknown keys are kept
    as they are (the converter then reports them)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        value = np.asarray(value)
        block = _BLOCK.match(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.T
        elif block:
            tower = "vision_model" if block.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{block.group(2)}"
            rest = block.group(3)
            if rest.startswith("attn.in_proj_"):
                leaf = rest.removeprefix("attn.in_proj_")  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3)):
                    out[f"{prefix}.self_attn.{name}.{leaf}"] = part
                continue
            module, _, leaf = rest.rpartition(".")
            out[f"{prefix}.{_BLOCK_PARTS.get(module, module)}.{leaf}"] = value
        elif key != "attn_mask":
            out[key] = value
    return out
