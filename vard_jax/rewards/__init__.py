"""Rewards: a registry of pure functions of (images, prompts) with metadata.

Importing the package registers the built-in rewards (each module's ``@register``); the
registry itself knows none of them, so the imports run one way (implementations ->
registry)."""

from vard_jax.rewards.registry import (Reward, RewardContext, RewardEvaluator, build, names,
                                       parse_spec, register)
from vard_jax.rewards import clip_rewards, host_rewards, pretrained_rewards  # noqa: F401,E402

__all__ = ["Reward", "RewardContext", "RewardEvaluator", "build", "names", "parse_spec",
           "register"]
