"""Pretrained reward models for Stable Diffusion: PickScore, HPS v2.1, CLIP score, LAION
aesthetic score.

All four are differentiable and jittable: images are preprocessed in JAX
(``vard_jax.models.clip``) and scored by Flax CLIP models, so DRaFT-style gradients, VARD's
direct last step and the reward-initialised value network (``Reward.backbone``) all work.

Where the weights come from (``config.reward.path``; ``""`` = the defaults below):

* ``pickscore``: ``MODEL[::PROCESSOR]``. MODEL is a hub id or directory of a CLIP model in
  the transformers layout; PROCESSOR holds the tokenizer and ``preprocessor_config.json``
  (default: MODEL itself when it has a tokenizer, else ``PICKSCORE_PROCESSOR``).
* ``clip_score``: ``MODEL[::PROCESSOR]`` as above (defaults: ``CLIP_MODEL``, its own processor).
* ``hpsv2``: ``[CHECKPOINT][::PROCESSOR]``. CHECKPOINT is an OpenCLIP weight file in open_clip's
  names (``.safetensors``, or the public pickled ``HPS_v2.1_compressed.pt`` with the ``pt``
  extra, read with ``torch.load(weights_only=True)``), a directory holding one (with
  ``open_clip_config.json`` when it is not ViT-H/14) or a hub id (default ``HPSV2_MODEL``);
  PROCESSOR as for PickScore (default ``PICKSCORE_PROCESSOR``). The score is the cosine of the
  normalised embeddings, as HPS v2 reports it.
* ``aesthetic``: ``[CLIP::]HEAD``. HEAD is a local ``.safetensors`` file with the LAION
  predictor's MLP in its PyTorch names (``layers.{0,2,4,6,7}.{weight,bias}``); CLIP (default
  ``AESTHETIC_CLIP``) gives the image embedding. The public head is distributed as a pickled
  ``.pth``; convert it once elsewhere, e.g.
  ``safetensors.torch.save_file(torch.load(pth, weights_only=True), "aesthetic_head.safetensors")``.
  Pickled files are never read here.

For a weighted sum such as ``"pickscore:1.0,aesthetic:0.1"``, ``reward.path`` names each
reward's source, ``;``-separated:
``"pickscore=/models/pickscore;aesthetic=/models/clip-l::/models/head.safetensors"``
(a reward not listed uses its defaults). A path without ``=`` is given to every reward.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.models import clip as clip_lib
from vard_jax.models import stable_diffusion as sd_lib
from vard_jax.models.nn import open_clip
from vard_jax.models.nn import weights as weights_lib
from vard_jax.tokenizer import CLIPTokenizer
from vard_jax.rewards.clip_rewards import clip_reward
from vard_jax.rewards.registry import Reward, RewardContext, register

#: PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
#: PickScore's tokenizer and image processor (those of the CLIP it was fine-tuned from).
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: HPS v2.1 (Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human preference pairs, as
#: open_clip saves it (a pickled training checkpoint: the ``pt`` extra reads it; a
#: ``.safetensors`` conversion of it needs nothing more).
HPSV2_MODEL = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"
#: open_clip's model config beside an OpenCLIP checkpoint (default: ``open_clip.VIT_H_14``).
OPEN_CLIP_CONFIG = "open_clip_config.json"
#: The CLIP of ``clip_score``.
CLIP_MODEL = "openai/clip-vit-large-patch14"
#: The CLIP whose image embedding the LAION aesthetic predictor reads.
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"

#: Separates a model from its processor (or a CLIP from the aesthetic head) in a path.
PART_SEPARATOR = "::"
#: Separates rewards in ``reward.path`` (``name=path;name=path``).
ENTRY_SEPARATOR = ";"

#: The LAION aesthetic predictor's MLP: widths after the 768-d CLIP ViT-L/14 embedding, and
#: the indices of its Linear layers in the PyTorch ``nn.Sequential`` (dropouts in between).
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_LAYER_INDICES = (0, 2, 4, 6, 7)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def path_for(context_path: str, name: str) -> str:
    """The part of ``reward.path`` meant for reward ``name`` (``""`` = its defaults)."""
    text = context_path.strip()
    if "=" not in text:
        return text
    entries = {}
    for entry in filter(None, (e.strip() for e in text.split(ENTRY_SEPARATOR))):
        key, separator, value = entry.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"reward.path entry {entry!r} is not 'reward_name=path'")
        entries[key.strip()] = value.strip()
    return entries.get(name, "")


class ClipBundle(NamedTuple):
    """A loaded CLIP reward model with its tokenizer and image preprocessing."""

    model: Any  # vard_jax.models.nn.clip.CLIPModel (parameters separate)
    params: Any
    tokenizer: Any  # CLIPTokenizer, or None when the source has none
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_length: int


def _failure(path: str) -> str:
    return (f"could not load reward model from '{path}' (no network or no such model); "
            "download it elsewhere and set --config.reward.path=/local/dir")


def _model_files(files: list[str]) -> list[str]:
    return ["*.json", "*.txt"] + sd_lib.weight_patterns(files, ("",),
                                                        weights_lib.TRANSFORMERS_WEIGHTS)


def _processor_files(files: list[str]) -> list[str]:
    del files
    return ["*.json", "*.txt"]


def _has_tokenizer(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() for name in _TOKENIZER_FILES)


def _preprocessing(directory: pathlib.Path, default_size: int) -> tuple[int, tuple, tuple]:
    """(crop size, mean, std) of the image processor in ``directory`` (CLIP's when absent)."""
    file = directory / PREPROCESSOR_CONFIG
    if not file.is_file():
        return default_size, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD
    processor = json.loads(file.read_text())
    crop = processor.get("crop_size", processor.get("size", default_size))
    if isinstance(crop, dict):  # {"height": h, "width": w} or {"shortest_edge": s}
        height = crop.get("height", crop.get("shortest_edge"))
        width = crop.get("width", height)
        if height is None or int(height) != int(width):
            raise ValueError(f"{file}: crop size {crop} is not supported (a square crop)")
        crop = height
    mean = tuple(float(v) for v in processor.get("image_mean", clip_lib.CLIP_MEAN))
    std = tuple(float(v) for v in processor.get("image_std", clip_lib.CLIP_STD))
    return int(crop), mean, std


@functools.lru_cache(maxsize=4)
def _clip_model(model_path: str, revision: str) -> tuple[Any, Any, pathlib.Path]:
    directory = sd_lib.resolve_pretrained(model_path, revision, _model_files, _failure(model_path))
    model, params = weights_lib.load_clip(directory)
    return model, params, directory


@functools.lru_cache(maxsize=8)
def _processor(directory: pathlib.Path, default_size: int) -> tuple[Any, int, tuple, tuple]:
    tokenizer = None
    if _has_tokenizer(directory):
        tokenizer = CLIPTokenizer.from_directory(directory)
    return (tokenizer, *_preprocessing(directory, default_size))


def load_clip(model_path: str, processor_path: str = "", revision: str = "") -> ClipBundle:
    """Loads a CLIP model and its processor (both cached: rewards sharing a CLIP share it).

    ``processor_path`` = ``""``: the model's own tokenizer/processor files. ``tokenizer`` is
    None when that source has no tokenizer files.
    """
    model, params, model_dir = _clip_model(model_path, revision)
    processor_dir = model_dir
    if processor_path:
        processor_dir = sd_lib.resolve_pretrained(processor_path, "", _processor_files,
                                                  _failure(processor_path))
    tokenizer, size, mean, std = _processor(processor_dir,
                                            model.config.vision_config.image_size)
    max_length = model.config.text_config.max_position_embeddings
    if tokenizer is not None:
        max_length = min(max_length, int(tokenizer.model_max_length))
    return ClipBundle(model, params, tokenizer, size, mean, std, max_length)


def _split(text: str) -> tuple[str, str]:
    first, separator, second = text.rpartition(PART_SEPARATOR)
    return (first, second) if separator else (text, "")


def _text_clip_reward(name: str, path: str, default_model: str, default_processor: str) -> Reward:
    """A CLIP image-text reward from ``MODEL[::PROCESSOR]`` (see the module docstring)."""
    model_path, processor_path = _split(path)
    model_path = model_path or default_model
    if processor_path:
        sources = [processor_path]
    elif path:  # the model's own tokenizer, else the default processor's
        sources = list(dict.fromkeys(["", default_processor]))
    else:
        sources = [default_processor]
    for source in sources:
        bundle = load_clip(model_path, source)
        if bundle.tokenizer is not None:
            return clip_reward(name, bundle.model, bundle.params, bundle.tokenizer,
                               bundle.max_length, image_size=bundle.image_size, mean=bundle.mean,
                               std=bundle.std)
    where = ", ".join(f"'{source or model_path}'" for source in sources)
    raise FileNotFoundError(f"reward {name!r}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) "
                            f"in {where}; give one as MODEL::PROCESSOR in reward.path")


@register("pickscore", "PickScore (CLIP ViT-H/14 preference model): logit_scale * cos "
          "(differentiable)")
def pickscore(context: RewardContext) -> Reward:
    return _text_clip_reward("pickscore", path_for(context.path, "pickscore"), PICKSCORE_MODEL,
                             PICKSCORE_PROCESSOR)


def _open_clip_file(path: str) -> pathlib.Path:
    """The weight file of an OpenCLIP checkpoint: a file, a directory holding one (a
    ``.safetensors`` file first, else ``HPSV2_FILE``), or a hub repository."""
    candidate = pathlib.Path(path)
    if candidate.is_file():
        return candidate
    directory = candidate if candidate.is_dir() else sd_lib.resolve_pretrained(
        path, "", lambda files: [HPSV2_FILE, OPEN_CLIP_CONFIG], _failure(path))
    for file in [*sorted(directory.glob("*.safetensors")), directory / HPSV2_FILE]:
        if file.is_file():
            return file
    raise FileNotFoundError(f"no OpenCLIP weights in {directory}: expected a .safetensors file "
                            f"or {HPSV2_FILE}")


@functools.lru_cache(maxsize=2)
def _open_clip_model(path: str) -> tuple[Any, Any]:
    file = _open_clip_file(path)
    config_file = file.parent / OPEN_CLIP_CONFIG
    architecture = (json.loads(config_file.read_text()) if config_file.is_file()
                    else open_clip.VIT_H_14)
    return weights_lib.load_open_clip(file, architecture)


@register("hpsv2", "HPS v2.1 (OpenCLIP ViT-H/14 preference model): cos of image and prompt "
          "embeddings (differentiable; reward.path = [checkpoint][::processor])")
def hpsv2(context: RewardContext) -> Reward:
    model_path, processor_path = _split(path_for(context.path, "hpsv2"))
    model, params = _open_clip_model(model_path or HPSV2_MODEL)
    processor = processor_path or PICKSCORE_PROCESSOR  # the ViT-H/14 tokenizer and processor
    directory = sd_lib.resolve_pretrained(processor, "", _processor_files, _failure(processor))
    tokenizer, size, mean, std = _processor(directory, model.config.vision_config.image_size)
    if tokenizer is None:
        raise FileNotFoundError(f"reward 'hpsv2': no tokenizer files "
                                f"({', '.join(_TOKENIZER_FILES)}) in '{processor}'; give one as "
                                "CHECKPOINT::PROCESSOR in reward.path")
    max_length = min(model.config.text_config.max_position_embeddings,
                     tokenizer.model_max_length)
    return clip_reward("hpsv2", model, params, tokenizer, max_length, image_size=size,
                       mean=mean, std=std, scaled=False)


@register("clip_score", "CLIP ViT-L/14 image-text score: logit_scale * cos (differentiable)")
def clip_score(context: RewardContext) -> Reward:
    return _text_clip_reward("clip_score", path_for(context.path, "clip_score"), CLIP_MODEL, "")


# --- the LAION aesthetic predictor -------------------------------------------------------------

class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: Linear layers without activations (dropout is inert at inference).

    Submodule names ``layers_<i>`` follow the PyTorch ``nn.Sequential`` indices.
    """

    widths: Sequence[int] = AESTHETIC_WIDTHS
    layer_indices: Sequence[int] = AESTHETIC_LAYER_INDICES

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        """Unit-norm image embeddings [B, D] -> scores [B]."""
        x = embeddings
        for width, index in zip(self.widths, self.layer_indices):
            x = nn.Dense(width, name=f"layers_{index}")(x)
        return x[..., 0]


def _check_head_file(file: str | pathlib.Path) -> pathlib.Path:
    file = pathlib.Path(file)
    if file.suffix != ".safetensors" or not file.is_file():
        raise FileNotFoundError(f"aesthetic head {str(file)!r} is not a .safetensors file "
                                "(convert the public .pth once elsewhere; see "
                                "vard_jax/rewards/pretrained_rewards.py)")
    return file


def load_aesthetic_head(file: str | pathlib.Path, embedding_dim: int) -> dict:
    """Flax params of ``AestheticHead`` from a safetensors file of the PyTorch layout.

    Raises one ValueError line when keys or shapes differ from the LAION predictor's.
    """
    from safetensors.numpy import load_file

    file = _check_head_file(file)
    state = load_file(str(file))
    params = {}
    expected = set()
    fan_in = embedding_dim
    for width, index in zip(AESTHETIC_WIDTHS, AESTHETIC_LAYER_INDICES):
        weight_key, bias_key = f"layers.{index}.weight", f"layers.{index}.bias"
        expected |= {weight_key, bias_key}
        weight, bias = state.get(weight_key), state.get(bias_key)
        shapes_ok = (weight is not None and bias is not None
                     and weight.shape == (width, fan_in) and bias.shape == (width,))
        if not shapes_ok:
            found = None if weight is None else weight.shape
            raise ValueError(f"aesthetic head {file}: needs {weight_key} of shape "
                             f"{(width, fan_in)} and {bias_key} of shape {(width,)}; "
                             f"found {found}")
        params[f"layers_{index}"] = {"kernel": jnp.asarray(weight.T, jnp.float32),
                                     "bias": jnp.asarray(bias, jnp.float32)}
        fan_in = width
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"aesthetic head {file}: unexpected tensors {', '.join(extra[:4])}")
    return params


def _vision_params(clip_params: Any) -> dict:
    """The CLIPModel params that image features use (the text tower is dropped)."""
    # CLIPModel creates ``logit_scale`` in setup, so every call needs it.
    return {"vision_model": clip_params["vision_model"],
            "visual_projection": clip_params["visual_projection"],
            "logit_scale": clip_params["logit_scale"]}


@register("aesthetic", "LAION aesthetic predictor on CLIP ViT-L/14 embeddings (differentiable; "
          "reward.path = [clip::]head.safetensors)")
def aesthetic(context: RewardContext) -> Reward:
    path = path_for(context.path, "aesthetic")
    if not path:
        raise ValueError("reward 'aesthetic' needs its MLP weights: set --config.reward.path="
                         "[clip_dir_or_id::]aesthetic_head.safetensors "
                         "(or 'aesthetic=...' in a sum)")
    clip_path, _, head_file = path.rpartition(PART_SEPARATOR)  # no "::": all of it is the head
    _check_head_file(head_file)  # before a CLIP download
    bundle = load_clip(clip_path or AESTHETIC_CLIP)
    head = AestheticHead()
    params = {"clip": _vision_params(bundle.params),
              "head": load_aesthetic_head(head_file, bundle.model.config.projection_dim)}
    clip_model, size, mean, std = bundle.model, bundle.image_size, bundle.mean, bundle.std

    def score_with(backbone_params: Any, images: jax.Array, prepared: Any) -> jax.Array:
        del prepared  # the aesthetic score does not read the prompt
        embeddings = clip_lib.image_embeddings(clip_model, backbone_params["clip"], images,
                                               size, mean, std)
        return head.apply({"params": backbone_params["head"]}, embeddings)

    def prepare(prompts: Sequence[str]) -> np.ndarray:
        # A device array per prompt keeps the reward jittable and batch-shardable.
        return np.zeros((len(prompts),), np.int32)

    return Reward(name="aesthetic", score=lambda images, data: score_with(params, images, data),
                  differentiable=True, jittable=True, prepare=prepare,
                  backbone=((clip_model, head), params, score_with))
