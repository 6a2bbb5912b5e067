"""What the policy trains: the whole UNet, or LoRA adapters on top of the frozen UNet.

A ``PolicyModel`` separates the *trainable* parameters (the ones in the train state, with
optimiser state) from the *reference* UNet parameters (the pretrained model, frozen):

* ``init(reference, key)``: the initial trainable parameters (the policy starts as the
  reference: a float32 copy of it, or adapters with B = 0);
* ``unet(trainable, reference)``: what ``eps_fn`` takes for the policy, and
  ``reference_unet(reference)`` for the pretrained model. For LoRA both are
  ``{"base": reference, "lora": ...}``: one copy of the base weights serves both models;
* ``merged(trainable, reference)``: plain UNet parameters (``pipeline.eps_fn`` takes them),
  for export or sampling elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from vard_jax.models import lora as lora_lib
from vard_jax.models.pipeline import Pipeline


@dataclasses.dataclass(frozen=True, eq=False)
class FullPolicy:
    """Full fine-tuning: every UNet parameter is trained (float32 master copy)."""

    pipeline: Pipeline

    def init(self, reference: Any, key: jax.Array) -> Any:
        del key
        return jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, jnp.float32), reference)

    def eps_fn(self, unet_params: Any, x, timesteps, context):
        return self.pipeline.eps_fn(unet_params, x, timesteps, context)

    def unet(self, trainable: Any, reference: Any) -> Any:
        """The float32 master weights cast to the reference's storage dtypes (bfloat16 with
        ``pretrained.param_dtype``): the model then computes exactly as the reference does
        at the start (D = 0), and the gradients reach the master copy through the cast."""
        return jax.tree_util.tree_map(lambda t, r: t.astype(r.dtype), trainable, reference)

    def reference_unet(self, reference: Any) -> Any:
        return reference

    def merged(self, trainable: Any, reference: Any) -> Any:
        del reference
        return trainable

    def describe(self) -> str:
        return "full fine-tuning"


@dataclasses.dataclass(frozen=True, eq=False)
class LoraPolicy:
    """LoRA adapters on the UNet's target Dense layers; the base weights stay frozen."""

    pipeline: Pipeline
    spec: lora_lib.LoraSpec

    def init(self, reference: Any, key: jax.Array) -> Any:
        return lora_lib.init(reference, self.spec, key)

    def eps_fn(self, unet_params: Any, x, timesteps, context):
        return lora_lib.apply_unmerged(self.pipeline.eps_fn, unet_params["lora"], self.spec.scale)(
            unet_params["base"], x, timesteps, context)

    def unet(self, trainable: Any, reference: Any) -> Any:
        return {"base": reference, "lora": trainable}

    def reference_unet(self, reference: Any) -> Any:
        return {"base": reference, "lora": {}}

    def merged(self, trainable: Any, reference: Any) -> Any:
        return lora_lib.merge(reference, trainable, self.spec.scale)

    def describe(self) -> str:
        return (f"LoRA rank {self.spec.rank}, alpha {self.spec.alpha:g} on "
                f"{','.join(self.spec.targets)}")


PolicyModel = FullPolicy | LoraPolicy


def make(policy_config: Any, pipeline: Pipeline) -> PolicyModel:
    """The policy parametrisation of ``config.policy`` (``lora_rank`` 0 = full fine-tuning)."""
    rank = int(policy_config.lora_rank)
    if rank == 0:
        return FullPolicy(pipeline)
    alpha = float(policy_config.lora_alpha) or float(rank)
    targets = lora_lib.parse_targets(policy_config.lora_targets)
    return LoraPolicy(pipeline, lora_lib.LoraSpec(rank, alpha, targets))
