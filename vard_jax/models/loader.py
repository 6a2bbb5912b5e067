"""Model families by name: each loader returns the same ``LoadedModel``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from vard_jax.models.pipeline import Pipeline
from vard_jax.rewards.registry import RewardContext


class LoadedModel(NamedTuple):
    pipeline: Pipeline
    params: dict  # {"unet", "text_encoder", optional "vae"}
    reward_context: RewardContext


_LOADERS: dict[str, Callable[[Any], LoadedModel]] = {}


def register_family(name: str):
    def wrap(fn):
        _LOADERS[name] = fn
        return fn
    return wrap


@register_family("shapes")
def _load_shapes(config) -> LoadedModel:
    from vard_jax.models import shapes as shapes_model

    pipeline, params, clip_model, clip_params = shapes_model.load(
        config.pretrained.path, random_init=config.pretrained.random_init, seed=config.train.seed)
    context = RewardContext(path=config.reward.path or config.pretrained.path,
                            world_clip=(clip_model, clip_params, pipeline.tokenizer))
    return LoadedModel(pipeline, params, context)


@register_family("stable_diffusion")
def _load_stable_diffusion(config) -> LoadedModel:
    from vard_jax.models import stable_diffusion

    if config.pretrained.random_init:
        raise ValueError("pretrained.random_init is for the shapes family; Stable Diffusion "
                         "is always loaded from its weights")
    pipeline, params = stable_diffusion.load(config.pretrained.path)
    # The reward's weights are its own (reward.path); a SD checkpoint holds no reward model.
    return LoadedModel(pipeline, params, RewardContext(path=config.reward.path))


def load(config) -> LoadedModel:
    family = config.pretrained.family
    if family not in _LOADERS:
        raise ValueError(f"pretrained.family {family!r} is unknown; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[family](config)
