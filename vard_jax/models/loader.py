"""Model families by name: each loader returns the same ``LoadedModel``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vard_jax.models.pipeline import Pipeline


class LoadedModel(NamedTuple):
    pipeline: Pipeline
    params: dict  # {"unet", "text_encoder", optional "vae"}
    # What the family offers the rewards (``vard_jax.rewards.RewardContext``): where reward
    # weights live ("" = the reward's default) and the shapes world's CLIP
    # (FlaxCLIPModel, params, tokenizer), None for other families.
    reward_path: str = ""
    world_clip: Optional[tuple[Any, Any, Any]] = None


_LOADERS: dict[str, Callable[[Any], LoadedModel]] = {}


def register_family(name: str):
    def wrap(fn):
        _LOADERS[name] = fn
        return fn
    return wrap


@register_family("shapes")
def _load_shapes(config, flow: bool = False) -> LoadedModel:
    from vard_jax.models import shapes as shapes_model

    pipeline, params, clip_model, clip_params = shapes_model.load(
        config.pretrained.path, random_init=config.pretrained.random_init, seed=config.train.seed,
        dtype=config.pretrained.dtype, flow=flow)
    # clip_alignment scores with the reward CLIP, trained with hard negatives (not the CLIP
    # whose text tower conditions the UNet).
    try:
        reward_params = shapes_model.load_reward(config.pretrained.path, clip_model)
    except FileNotFoundError:
        if not config.pretrained.random_init:
            raise
        reward_params = clip_params  # random weights throughout, as asked
    return LoadedModel(pipeline, params, reward_path=config.reward.path or config.pretrained.path,
                       world_clip=(clip_model, reward_params, pipeline.tokenizer))


@register_family("shapes_flow")
def _load_shapes_flow(config) -> LoadedModel:
    """The shapes world's flow-matching MMDiT (same tokenizer, text encoder and rewards)."""
    return _load_shapes(config, flow=True)


@register_family("stable_diffusion")
def _load_stable_diffusion(config) -> LoadedModel:
    from vard_jax.models import stable_diffusion

    if config.pretrained.random_init:
        raise ValueError("pretrained.random_init is for the shapes family; Stable Diffusion "
                         "is always loaded from its weights")
    pretrained = config.pretrained
    pipeline, params = stable_diffusion.load(pretrained.path, dtype=pretrained.dtype,
                                             variant=pretrained.variant,
                                             attention=pretrained.attention,
                                             resolution=pretrained.resolution)
    # The reward's weights are its own (reward.path); a SD checkpoint holds no reward model.
    return LoadedModel(pipeline, params, reward_path=config.reward.path)


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Floating-point leaves of ``tree`` as ``dtype`` (other leaves unchanged)."""
    dtype = jnp.dtype(dtype)

    def cast(leaf):
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


def load(config) -> LoadedModel:
    """The family's model; its frozen weights stored as ``pretrained.param_dtype``, its UNet's
    and text encoder's attention kernel ``pretrained.attention``."""
    family = config.pretrained.family
    if family not in _LOADERS:
        raise ValueError(f"pretrained.family {family!r} is unknown; known: {', '.join(sorted(_LOADERS))}")
    loaded = _LOADERS[family](config)
    attention = config.pretrained.attention
    if loaded.pipeline.unet.implementation != attention:
        pipeline = loaded.pipeline
        loaded = loaded._replace(pipeline=dataclasses.replace(
            pipeline, unet=pipeline.unet.clone(implementation=attention),
            text_encoder=pipeline.text_encoder.clone(implementation=attention)))
    if jnp.dtype(config.pretrained.param_dtype) == jnp.float32:
        return loaded
    return loaded._replace(params=cast_floats(loaded.params, config.pretrained.param_dtype))
