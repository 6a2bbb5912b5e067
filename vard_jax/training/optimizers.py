"""The optimisers of a run, their learning-rate schedules, and how many policy steps an
epoch makes (the schedules' length); the optimiser step shared by every algorithm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vard_jax.algorithms import ddpo
from vard_jax.config import PPO_ALGORITHMS, ConfigError
from vard_jax.training import faults
from vard_jax.training.state import TrainState


def learning_rate_schedule(peak: float, warmup: int, total: int, kind: str) -> optax.Schedule:
    """Linear warm-up over ``warmup`` updates (the first update already gets peak / warmup,
    not 0), then constant or cosine decay to 0 at update ``total``."""
    def warmup_fn(step):
        return peak * jnp.minimum((step + 1.0) / warmup, 1.0)

    if kind == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    else:
        rest = optax.constant_schedule(peak)
    if not warmup:
        return rest
    return optax.join_schedules([warmup_fn, rest], [warmup])


def make_optimizer(learning_rate: optax.ScalarOrSchedule, weight_decay: float,
                   grad_clip: float) -> optax.GradientTransformation:
    """Adam(W) at ``learning_rate`` (a rate or a ``learning_rate_schedule``) with optional
    global-norm clipping."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    if weight_decay > 0:
        parts.append(optax.adamw(learning_rate, weight_decay=weight_decay))
    else:
        parts.append(optax.adam(learning_rate))
    return optax.chain(*parts)


class Optimizers(NamedTuple):
    policy_learning_rate: optax.Schedule  # rate by policy update count
    policy: optax.GradientTransformation
    value_learning_rate: optax.Schedule  # rate by value update count
    value: optax.GradientTransformation


def make_optimizers(config, policy_updates_per_epoch: int) -> Optimizers:
    """The policy and value optimisers (and their rate schedules) of a run whose policy makes
    ``policy_updates_per_epoch`` optimiser steps an epoch (``policy_updates_per_epoch``)."""
    peak = config.policy.learning_rate
    if config.algorithm in PPO_ALGORITHMS and config.ddpo.learning_rate > 0.0:
        peak = config.ddpo.learning_rate  # DDPO's own rate (ddpo-pytorch's default)
    policy_lr = learning_rate_schedule(
        peak, config.policy.warmup_steps,
        config.train.epochs * policy_updates_per_epoch, config.policy.lr_schedule)
    value_lr = learning_rate_schedule(config.value.learning_rate, config.value.warmup_steps, 0,
                                      "constant")
    return Optimizers(
        policy_lr, make_optimizer(policy_lr, config.policy.weight_decay, config.policy.grad_clip),
        value_lr, make_optimizer(value_lr, config.value.weight_decay, config.value.grad_clip))


def ddpo_minibatch_size(config, stochastic_steps: int, data_shards: int) -> int:
    """Transitions per PPO micro-batch: ``ddpo.minibatch_size``, at most what an epoch holds
    (its chains when ``ddpo.accumulate_timesteps``, else its transitions), rounded down to a
    multiple of the data shards (and at least one per shard)."""
    units = config.sample.batches_per_epoch * config.sample.batch_size
    if not config.ddpo.accumulate_timesteps:
        units *= stochastic_steps
    size = min(config.ddpo.minibatch_size, units)
    return max(size - size % data_shards, data_shards)


def ddpo_updates_per_pass(config, stochastic_steps: int, data_shards: int) -> int:
    """PPO optimiser steps in one pass over an epoch's transitions (``ddpo.plan_updates``);
    raises ConfigError when ``ddpo.gradient_accumulation`` leaves none."""
    chains = config.sample.batches_per_epoch * config.sample.batch_size
    size = ddpo_minibatch_size(config, stochastic_steps, data_shards)
    updates = ddpo.updates_per_pass(chains, stochastic_steps, size,
                                    config.ddpo.gradient_accumulation,
                                    config.ddpo.accumulate_timesteps)
    if updates < 1:
        unit = "chains" if config.ddpo.accumulate_timesteps else "transitions"
        raise ConfigError(f"config.ddpo.gradient_accumulation = "
                          f"{config.ddpo.gradient_accumulation}: an epoch holds fewer minibatches "
                          f"of {size} {unit}; lower it or sample more per epoch")
    return updates


def policy_updates_per_epoch(config, stochastic_steps: int, data_shards: int) -> int:
    """Policy optimiser steps in one epoch of ``config.algorithm``: the learning-rate schedule
    spans this times ``train.epochs``. ``stochastic_steps``: the denoising steps DDPO trains
    (``ddpo.stochastic_steps``)."""
    batches = config.sample.batches_per_epoch
    if config.algorithm in PPO_ALGORITHMS:  # PPO steps over the epoch's transitions
        return config.ddpo.inner_epochs * ddpo_updates_per_pass(config, stochastic_steps,
                                                                data_shards)
    if config.algorithm == "draft":  # one step per batch (DraftStage.epoch)
        return batches
    return batches * config.policy.updates_per_epoch  # VardStage.policy_update


def apply_policy_gradient(optimizer: optax.GradientTransformation, state: TrainState, grads: Any,
                          loss: jax.Array, metrics: dict, reward_queries: int = 0):
    """One optimiser step of the policy (skipped when loss or gradient is not finite)."""
    updates, opt_state = optimizer.update(grads, state.policy_opt_state, state.policy_params)
    new_state = state.replace(
        policy_params=optax.apply_updates(state.policy_params, updates),
        policy_opt_state=opt_state, policy_updates=state.policy_updates + 1,
        reward_queries=state.reward_queries + reward_queries)
    grad_norm = optax.tree.norm(grads)
    state, skipped = faults.keep_finite(state, new_state, "policy", loss, grad_norm)
    return state, {**metrics, "policy_loss": loss, "policy_grad_norm": grad_norm, **skipped}
