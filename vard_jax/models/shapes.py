"""The embedded default model: a tiny pixel-space text-to-image model of the shapes world.

Same networks as Stable Diffusion (``vard_jax.models.nn``): a ``UNet2DConditionModel`` with
cross-attention, a ``CLIPTextModel`` text encoder (the text tower of the world's tiny CLIP,
frozen, as SD's is), and a ``CLIPTokenizer`` built from the project's own vocabulary files.
The ``clip_alignment`` reward (the PickScore stand-in) is a second ``CLIPModel`` of the
same size: the world CLIP trained further with hard and off-distribution negatives
(``vard_jax.worlds.negatives``), so that fine-tuning against it is hard to game.

A second base model of the same world is a flow-matching MMDiT (``nn.mmdit``, Stable
Diffusion 3's transformer at a tiny size; family ``shapes_flow``), conditioned on the same
CLIP's text tower with its projection (``MMDiTPipeline``): every flow code path runs on it.

Assets (written by ``experiments/pretrain_shapes.py``) live in ``vard_jax/assets/shapes``:
``model_index.json`` (architectures), ``tokenizer/``, and orbax checkpoints ``unet/``, ``clip/``
(the world CLIP, whose text tower is the text encoder), ``reward/`` (the reward CLIP) and
``transformer/`` (the flow model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vard_jax.diffusion.flow import FlowMatchConfig
from vard_jax.diffusion.schedule import NoiseScheduleConfig
from vard_jax.models.nn import clip as clip_lib
from vard_jax.models.nn import mmdit as mmdit_lib
from vard_jax.models.nn import unet as unet_lib
from vard_jax.models.pipeline import MMDiTPipeline, Pipeline
from vard_jax.worlds import shapes as world
from vard_jax.worlds import tokenizer_files

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "shapes"
REWARD_DIR = "reward"
FLOW_DIR = "transformer"

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=world.IMAGE_SIZE,
    in_channels=world.CHANNELS,
    out_channels=world.CHANNELS,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=64,
    # The shipped UNet was trained with the tanh-approximated GELU in its feed-forward gates.
    geglu_approximate=True,
)

CLIP_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=tokenizer_files.MAX_LENGTH, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)
CLIP_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    image_size=world.IMAGE_SIZE, patch_size=4, num_channels=3,
)
CLIP_PROJECTION_DIM = 64

#: The DDPM schedule of the pixel-space UNet. Sampling clips the predicted x0 to [-1, 1]
#: (``clip_sample``, diffusers' DDIM default and the usual choice in pixel space): without it
#: the few-step sampler extrapolates the UNet's error in the image's mean colour (x0 = (x_t -
#: sqrt(1 - a) eps) / sqrt(a), a ~ 1e-4 at the first step) into canvases of one saturated
#: colour set by the starting noise, and the shipped model's shape fidelity drops from ~0.3
#: to ~0.1 (docs/SHAPES_WORLD.md). Training does not depend on it.
SCHEDULE = NoiseScheduleConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                               beta_schedule="linear", steps_offset=0, set_alpha_to_one=True,
                               clip_sample=True, prediction_type="epsilon")


#: The flow model: SD 3.5's transformer (RMS query/key norms, one MMDiT-X layer) at 32 x 32
#: pixels in 2 x 2 patches, conditioned on the world CLIP's 64-wide text states and its
#: projected embedding.
MMDIT_CONFIG: dict[str, Any] = dict(
    sample_size=world.IMAGE_SIZE, patch_size=2, in_channels=world.CHANNELS,
    out_channels=world.CHANNELS, num_layers=6, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=CLIP_PROJECTION_DIM,
    pos_embed_max_size=world.IMAGE_SIZE // 2, qk_norm="rms_norm", dual_attention_layers=(0,),
)
#: Rectified flow without a timestep shift (the images are tiny).
FLOW_SCHEDULE = FlowMatchConfig(num_train_timesteps=1000, shift=1.0)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return dict(bos_token_id=int(tokenizer.bos_token_id), eos_token_id=int(tokenizer.eos_token_id),
                pad_token_id=int(tokenizer.pad_token_id), vocab_size=len(tokenizer))


def build_clip(tokenizer: Any) -> clip_lib.CLIPModel:
    """The world's tiny CLIP sized for the tokenizer (parameters separate)."""
    text_config = clip_lib.CLIPTextConfig(**{**CLIP_TEXT_CONFIG, **_special_ids(tokenizer)})
    config = clip_lib.CLIPConfig(text_config, clip_lib.CLIPVisionConfig(**CLIP_VISION_CONFIG),
                                 projection_dim=CLIP_PROJECTION_DIM)
    return clip_lib.CLIPModel(config)


def build_unet(dtype: Any = jnp.float32) -> unet_lib.UNet2DConditionModel:
    return unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(UNET_CONFIG), dtype=dtype)


def build_pipeline(tokenizer: Any, clip_model: clip_lib.CLIPModel,
                   dtype: Any = jnp.float32) -> Pipeline:
    """The world's pipeline; ``dtype`` is the UNet's and text encoder's computation dtype."""
    text_encoder = clip_lib.CLIPTextModel(clip_model.config.text_config, dtype=dtype)
    return Pipeline(unet=build_unet(dtype), text_encoder=text_encoder, tokenizer=tokenizer,
                    schedule=SCHEDULE, sample_shape=(world.CHANNELS, world.IMAGE_SIZE,
                                                     world.IMAGE_SIZE),
                    max_length=tokenizer_files.MAX_LENGTH)


def build_flow_pipeline(tokenizer: Any, clip_model: clip_lib.CLIPModel,
                        dtype: Any = jnp.float32) -> MMDiTPipeline:
    """The world's flow model: the MMDiT with the CLIP's text tower and projection."""
    text_config = dataclasses.replace(clip_model.config.text_config,
                                      projection_dim=clip_model.config.projection_dim)
    transformer = mmdit_lib.SD3Transformer2DModel(mmdit_lib.MMDiTConfig.from_dict(MMDIT_CONFIG),
                                                  dtype=dtype)
    return MMDiTPipeline(unet=transformer,
                         text_encoder=clip_lib.CLIPTextModelWithProjection(text_config,
                                                                           dtype=dtype),
                         tokenizer=tokenizer, schedule=FLOW_SCHEDULE,
                         sample_shape=(world.CHANNELS, world.IMAGE_SIZE, world.IMAGE_SIZE),
                         max_length=tokenizer_files.MAX_LENGTH)


def init_flow_params(transformer: mmdit_lib.SD3Transformer2DModel, key: jax.Array) -> Any:
    return transformer.init_params(key, context_length=tokenizer_files.MAX_LENGTH)


def flow_text_params(clip_params: Any) -> dict:
    """The flow model's text encoder (``CLIPTextModelWithProjection``) params inside the
    CLIP's."""
    return {"text_model": clip_params["text_model"],
            "text_projection": clip_params["text_projection"]}


def init_unet_params(unet: unet_lib.UNet2DConditionModel, key: jax.Array) -> Any:
    return unet.init_params(key, context_length=tokenizer_files.MAX_LENGTH)


def init_clip_params(clip_model: clip_lib.CLIPModel, key: jax.Array) -> Any:
    return clip_model.init_params(key)


def text_encoder_params(clip_params: Any) -> dict:
    """The text encoder's (``CLIPTextModel``) params inside the CLIP's params."""
    return {"text_model": clip_params["text_model"]}


def _restore(path: pathlib.Path, abstract: Any) -> Any:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.resolve(), abstract)


def load(asset_dir: str | pathlib.Path = "", random_init: bool = False,
         seed: int = 0, dtype: Any = jnp.float32,
         flow: bool = False) -> tuple[Pipeline, dict, Any, Any]:
    """Loads the shipped world: (pipeline, params, clip_model, clip_params).

    ``params`` = {"unet", "text_encoder"} (float32). With ``random_init`` the UNet is freshly
    initialised (the CLIP still comes from the assets when present, else is random too).
    ``dtype`` is the computation dtype of the pipeline's UNet and text encoder; the reward's
    CLIP computes in float32. ``flow``: the flow model (``transformer/``) in the UNet's place.
    """
    directory = pathlib.Path(asset_dir) if asset_dir else ASSET_DIR
    tokenizer_dir = directory / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists():
        raise FileNotFoundError(f"no tokenizer files under {tokenizer_dir}; run "
                                "experiments/pretrain_shapes.py or point pretrained.path at them")
    tokenizer = tokenizer_files.load_tokenizer(tokenizer_dir)
    clip_model = build_clip(tokenizer)
    if flow:
        pipeline = build_flow_pipeline(tokenizer, clip_model, dtype)
        init, folder, text_params = init_flow_params, FLOW_DIR, flow_text_params
    else:
        pipeline = build_pipeline(tokenizer, clip_model, dtype)
        init, folder, text_params = init_unet_params, "unet", text_encoder_params
    key_unet, key_clip = jax.random.split(jax.random.PRNGKey(seed))
    abstract_unet = jax.eval_shape(lambda: init(pipeline.unet, key_unet))
    abstract_clip = jax.eval_shape(lambda: init_clip_params(clip_model, key_clip))
    if (directory / "clip").exists():
        clip_params = _restore(directory / "clip", abstract_clip)
    elif random_init:
        clip_params = init_clip_params(clip_model, key_clip)
    else:
        raise FileNotFoundError(f"no CLIP checkpoint under {directory / 'clip'}")
    if random_init:
        unet_params = init(pipeline.unet, key_unet)
    elif (directory / folder).exists():
        unet_params = _restore(directory / folder, abstract_unet)
    else:
        command = "experiments/pretrain_shapes.py" + (" --flow" if flow else "")
        raise FileNotFoundError(f"no checkpoint under {directory / folder}; run {command}, or "
                                "set pretrained.random_init")
    params = {"unet": unet_params, "text_encoder": text_params(clip_params)}
    return pipeline, params, clip_model, clip_params


def load_reward(asset_dir: str | pathlib.Path, clip_model: Any) -> Any:
    """The reward CLIP's params (``reward/``); asset directories written before it existed
    score with the world CLIP (``clip/``), with a warning."""
    directory = pathlib.Path(asset_dir) if asset_dir else ASSET_DIR
    abstract = jax.eval_shape(lambda: init_clip_params(clip_model, jax.random.PRNGKey(0)))
    if (directory / REWARD_DIR).exists():
        return _restore(directory / REWARD_DIR, abstract)
    if (directory / "clip").exists():
        logging.warning("%s has no %s/ checkpoint: clip_alignment scores with the world CLIP "
                        "(clip/), which fine-tuning games easily; run experiments/"
                        "pretrain_shapes.py --reward_only --out=%s", directory, REWARD_DIR,
                        directory)
        return _restore(directory / "clip", abstract)
    raise FileNotFoundError(f"no reward CLIP under {directory / REWARD_DIR}; run "
                            "experiments/pretrain_shapes.py --reward_only")


def _write_checkpoint(target: pathlib.Path, tree: Any) -> None:
    if target.exists():
        shutil.rmtree(target)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, jax.tree_util.tree_map(np.asarray, tree))


def save_reward(directory: str | pathlib.Path, params: Any, figures: dict) -> None:
    """Writes the reward CLIP (``reward/``) and its figures into ``model_index.json``."""
    directory = pathlib.Path(directory).resolve()
    _write_checkpoint(directory / REWARD_DIR, params)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index["reward"] = figures
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def save_flow(directory: str | pathlib.Path, params: Any, figures: dict) -> None:
    """Writes the flow model (``transformer/``) and its architecture and figures into
    ``model_index.json``."""
    directory = pathlib.Path(directory).resolve()
    _write_checkpoint(directory / FLOW_DIR, params)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index["flow"] = {"transformer": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in MMDIT_CONFIG.items()},
                     "schedule": FLOW_SCHEDULE.__dict__, "quality": figures}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def save(directory: str | pathlib.Path, unet_params: Any, clip_params: Any,
         metadata: dict) -> None:
    """Writes the world's checkpoints and an index with the architectures and quality figures."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_files.write_tokenizer_files(directory / "tokenizer")
    for name, tree in (("unet", unet_params), ("clip", clip_params)):
        _write_checkpoint(directory / name, tree)
    previous = directory / "model_index.json"
    kept = {k: v for k, v in json.loads(previous.read_text()).items()
            if k in ("reward", "flow")} if previous.exists() else {}
    index = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
             "clip_text": CLIP_TEXT_CONFIG, "clip_vision": CLIP_VISION_CONFIG,
             "schedule": SCHEDULE.__dict__, **kept, **metadata}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
