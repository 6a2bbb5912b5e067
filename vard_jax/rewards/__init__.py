"""Rewards: a registry of pure functions of (images, prompts) with metadata."""

from vard_jax.rewards.registry import Reward, RewardContext, RewardEvaluator, build, names, parse_spec

__all__ = ["Reward", "RewardContext", "RewardEvaluator", "build", "names", "parse_spec"]
