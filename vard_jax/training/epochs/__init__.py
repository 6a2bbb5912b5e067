"""What one epoch does, per algorithm (``config.algorithm``); the loop around it is shared.

* ``vard``: roll out the policy -> rewards (host) -> value update(s) on the fresh states ->
  dense policy update(s) through the value. Value pre-training epochs come first.
* ``ddpo``: roll out the policy storing transitions and log-probs -> rewards (host) ->
  per-prompt advantages -> PPO-clip epochs over minibatches of transitions.
* ``grpo``: Flow-GRPO: DDPO's epoch on groups of samples per prompt, advantages normalised
  within each group, a KL penalty to the pretrained model's step kernels.
* ``value``: VARD's value stage alone on the pretrained model's samples (the policy is never
  updated): a value for sampling-time steering of the base model (``vard_jax.sample``).
* ``draft``: per batch, one update that samples with gradients and backpropagates the
  (differentiable, in-graph) reward through the last K steps (AlignProp: random K).

Each stage returns the epoch's metrics, with ``reward_mean``/``reward_std`` of the samples
it trained on, ``images`` (samples drawn, for the throughput figure) and, where the rewards
are computed on the host, ``rewards`` (their values, for the loggers' histograms; DRaFT's are
computed inside its update). The state's ``reward_queries`` counts every reward evaluated for
training.
"""

from __future__ import annotations

from vard_jax.training.epochs.base import Stage, split_key
from vard_jax.training.epochs.ddpo import DDPOStage, GRPOStage
from vard_jax.training.epochs.draft import DraftStage
from vard_jax.training.epochs.vard import ValueStage, VardStage

STAGES: dict[str, type[Stage]] = {"vard": VardStage, "value": ValueStage, "ddpo": DDPOStage,
                                  "grpo": GRPOStage, "draft": DraftStage}

__all__ = ["STAGES", "Stage", "make", "split_key"]


def make(loop) -> Stage:
    """The stage of ``loop.config.algorithm``."""
    return STAGES[loop.config.algorithm](loop)
