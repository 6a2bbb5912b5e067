"""DDPO (Black et al. 2023) and Flow-GRPO (Liu et al. 2025): PPO with a clipped surrogate on
stored denoising transitions.

A sampling rollout (``vard_jax.diffusion.rollout``) stores, for every step i of every chain,
the transition (x_i, x_{i-1}) and log p_old(x_{i-1} | x_i). Each trajectory's final reward
becomes an advantage (standardised per prompt: ``vard_jax.algorithms.advantages``), shared
by all of its transitions. An update
recomputes log p_theta(x_{i-1} | x_i) with the same DDIM step and guidance as the rollout and
minimises
    L = mean max(-A r, -A clip(r, 1 - c, 1 + c)),   r = exp(log p_theta - log p_old).

Only stochastic steps (eta > 0, sigma_i > 0) have a density; a deterministic step contributes
ratio 1 and no gradient, so ``stochastic_steps`` lists the steps worth storing.

Flow-GRPO is the same surrogate on a flow model's SDE steps, with advantages normalised within
groups of samples of one prompt (``advantages.group_advantages``) and a KL penalty to the
pretrained model: ``kl_beta`` times, per transition, the KL between the policy's and the
reference's Gaussian kernels at the stored state, mean over dimensions of
(mu_theta - mu_ref)^2 / (2 sigma_i^2). (Flow-GRPO's code divides by the SDE coefficient s_i^2
instead of the kernel variance s_i^2 |dt|: this beta is Flow-GRPO's times |dt|, about 1 / T;
its 0.01 at 10 steps is about 0.001 here.)

Log-prob reduction. ``ddim.gaussian_log_prob`` sums over the C*H*W dimensions, so log-ratios
grow with the image size and a fixed clip range means different things at different
resolutions. DDPO's reference implementation averages over dimensions instead, which makes the
clip range (typically 1e-4) independent of the latent size. ``reduce="mean"`` (the default of
``DDPOConfig``) does that; ``reduce="sum"`` keeps the true joint log-density (the ratio is then
the exact likelihood ratio of the Gaussian step). Stored and recomputed log-probs must use the
same reduction: ``transitions_from_trajectory`` converts the rollout's summed log-probs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import ddim
from vard_jax.diffusion.rollout import Trajectory
from vard_jax.diffusion.schedule import Schedule

REDUCTIONS = ("sum", "mean")


class DDPOConfig(NamedTuple):
    """Static settings of the DDPO loss (Python scalars: pass by closure or as a static arg)."""

    clip_range: float  # c of the clipped surrogate
    eta: float  # DDIM stochasticity of the sampling rollout (must be > 0)
    guidance_scale: float  # classifier-free guidance weight of the sampling rollout
    adv_clip: Optional[float] = None  # advantages are clipped to [-adv_clip, adv_clip]
    reduce: str = "mean"  # log-prob reduction over dimensions: "mean" | "sum"
    kl_beta: float = 0.0  # weight of the KL to the reference's kernels (Flow-GRPO: module doc)


class DDPOBatch(NamedTuple):
    """N stored transitions (N = chains x stored steps, in any order)."""

    x_t: jax.Array  # [N, C, H, W] state entering the step
    x_prev: jax.Array  # [N, C, H, W] state after the step
    step_index: jax.Array  # [N] int32, the step's index into the schedule (0 = noisiest)
    old_log_prob: jax.Array  # [N] log p_old(x_prev | x_t), in the config's reduction
    advantages: jax.Array  # [N] the chain's advantage
    context: jax.Array  # [N, L, D] prompt embeddings
    null_context: jax.Array  # [1, L, D] the empty prompt's embedding (shared, not per item)

    def take(self, indices: jax.Array | np.ndarray) -> "DDPOBatch":
        """The sub-batch of transitions ``indices`` ([M] ints); ``null_context`` is kept."""
        per_item = [getattr(self, name)[indices] for name in self._fields[:-1]]
        return DDPOBatch(*per_item, null_context=self.null_context)

    @property
    def size(self) -> int:
        return self.x_t.shape[0]


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"log-prob reduce {reduce!r}: use 'sum' or 'mean'")


def _check_stochastic(eta: float) -> None:
    if not float(eta) > 0.0:
        raise ValueError(f"DDPO needs a stochastic sampler (eta > 0); eta = {eta} makes every DDIM "
                         "step deterministic, so transitions have no log-probability")


def _reduce_log_prob(log_prob_sum: jax.Array, sample_shape: tuple[int, ...], reduce: str) -> jax.Array:
    """[B] summed log-probs -> the requested reduction over ``sample_shape`` dimensions."""
    if reduce == "sum":
        return log_prob_sum
    return log_prob_sum / math.prod(sample_shape)


def transition_log_prob(
    eps_fn: ddim.EpsFn,
    params: Any,
    schedule: Schedule,
    x_t: jax.Array,
    step_index: jax.Array | int,
    x_prev: jax.Array,
    context: jax.Array,
    null_context: jax.Array,
    eta: float,
    guidance_scale: float,
    reduce: str = "sum",
) -> jax.Array:
    """log p_params(x_prev | x_t) of the schedule's transitions (DDIM, or a flow SDE): [B].

    The model call is ``ddim.guided_eps`` on the whole batch (one call, per-sample timesteps);
    the step is ``schedule.step(..., noise=None, ...)`` and the density
    ``ddim.gaussian_log_prob``, exactly as in the rollout. Because those take one step index
    for the whole batch, they are mapped over the samples (``jax.vmap``), so that a minibatch
    may mix steps.

    Args:
      x_t: [B, C, H, W] states entering the steps.
      step_index: [B] int or a scalar: each transition's step index (0 = noisiest).
      x_prev: [B, C, H, W] states after the steps.
      context: [B, L, D]; null_context: [1 or B, L, D].
      eta, guidance_scale: as in the rollout that produced the transitions.
      reduce: "sum" (the rollout's ``Trajectory.log_prob``) or "mean" over C*H*W.

    Returns:
      [B] log-probabilities; 0 where the step is deterministic (sigma_i = 0).
    """
    _check_reduce(reduce)
    mean, std = transition_mean(eps_fn, params, schedule, x_t, step_index, context,
                                null_context, eta, guidance_scale)
    log_prob = jax.vmap(lambda x, m, s: ddim.gaussian_log_prob(x[None], m[None], s)[0])(
        x_prev, mean, std)
    return _reduce_log_prob(log_prob, x_t.shape[1:], reduce)


def transition_mean(eps_fn: ddim.EpsFn, params: Any, schedule: Schedule, x_t: jax.Array,
                    step_index: jax.Array | int, context: jax.Array, null_context: jax.Array,
                    eta: float, guidance_scale: float) -> tuple[jax.Array, jax.Array]:
    """(mean [B, ...], std [B]) of the transitions' Gaussian kernels under ``params``: one
    guided model call on the batch, the schedule's step mapped over the samples (each may be
    at another step)."""
    batch = x_t.shape[0]
    index = jnp.broadcast_to(jnp.asarray(step_index, jnp.int32), (batch,))
    model_output = ddim.guided_eps(eps_fn, params, x_t, schedule.timesteps[index], context,
                                   null_context, guidance_scale)

    def one(i: jax.Array, x: jax.Array, output: jax.Array) -> tuple[jax.Array, jax.Array]:
        step = schedule.step(i, x[None], output[None], None, eta)
        return step.mean[0], step.std

    return jax.vmap(one)(index, x_t, model_output)


def kernel_kl(mean: jax.Array, reference_mean: jax.Array, std: jax.Array) -> jax.Array:
    """[B] KL between Gaussian kernels of one std and two means, mean over dimensions:
    mean((mean - reference_mean)^2) / (2 std^2); 0 where the step is deterministic."""
    squared = jnp.mean(((mean - reference_mean) ** 2).reshape(mean.shape[0], -1), axis=-1)
    safe = jnp.where(std > 0, std, 1.0)
    return jnp.where(std > 0, squared / (2.0 * safe**2), 0.0)


def ppo_loss(new_log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
             clip_range: float, adv_clip: Optional[float] = None) -> tuple[jax.Array, dict]:
    """The clipped surrogate and its diagnostics.

    Args:
      new_log_prob: [B] log-probs under the parameters being trained (differentiable).
      old_log_prob: [B] log-probs under the sampling parameters (treated as constants).
      advantages: [B]; clipped to [-adv_clip, adv_clip] when ``adv_clip`` is given.
      clip_range: c; the ratio is clipped to [1 - c, 1 + c].

    Returns:
      (loss [], metrics): loss = mean max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(new - old);
      metrics: approx_kl = 0.5 mean (new - old)^2, log_ratio_max = max |new - old|,
      clipfrac = fraction with |r - 1| > c, ratio_mean, and the loss itself.
    """
    old_log_prob = jax.lax.stop_gradient(old_log_prob)
    advantages = jax.lax.stop_gradient(advantages)
    if adv_clip is not None:
        advantages = jnp.clip(advantages, -adv_clip, adv_clip)
    log_ratio = new_log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.mean(jnp.maximum(unclipped, clipped))
    ratio_const = jax.lax.stop_gradient(ratio)
    metrics = {
        "ppo_loss": jax.lax.stop_gradient(loss),
        "approx_kl": 0.5 * jnp.mean(jax.lax.stop_gradient(log_ratio) ** 2),
        "log_ratio_max": jnp.max(jnp.abs(jax.lax.stop_gradient(log_ratio))),
        "clipfrac": jnp.mean((jnp.abs(ratio_const - 1.0) > clip_range).astype(jnp.float32)),
        "ratio_mean": jnp.mean(ratio_const),
    }
    return loss, metrics


def ddpo_loss(eps_fn: ddim.EpsFn, params: Any, schedule: Schedule, batch: DDPOBatch,
              config: DDPOConfig, at_sampling_params: jax.Array | bool = False,
              reference: Optional[tuple[ddim.EpsFn, Any]] = None) -> tuple[jax.Array, dict]:
    """The DDPO loss of a minibatch of stored transitions; differentiate w.r.t. ``params``.

    With ``config.kl_beta > 0`` (Flow-GRPO) ``reference = (eps_fn, params)`` of the pretrained
    model adds ``kl_beta * mean kernel_kl`` (the module docstring).

    ``batch.old_log_prob`` must use ``config.reduce`` (``transitions_from_trajectory`` does).
    ``at_sampling_params`` (may be traced): ``params`` are the ones that sampled the batch (the
    first optimiser step of an epoch), so this computation's own log-probs are the old ones:
    the ratio is exactly 1 by construction, whatever the rounding of another computation.
    Raises ValueError when ``config.eta`` is not positive.
    """
    _check_stochastic(config.eta)
    _check_reduce(config.reduce)
    args = (batch.x_t, batch.step_index, batch.context, batch.null_context, config.eta,
            config.guidance_scale)
    mean, std = transition_mean(eps_fn, params, schedule, *args)
    log_prob = jax.vmap(lambda x, m, s: ddim.gaussian_log_prob(x[None], m[None], s)[0])(
        batch.x_prev, mean, std)
    new_log_prob = _reduce_log_prob(log_prob, batch.x_t.shape[1:], config.reduce)
    old_log_prob = jnp.where(at_sampling_params, jax.lax.stop_gradient(new_log_prob),
                             batch.old_log_prob)
    loss, metrics = ppo_loss(new_log_prob, old_log_prob, batch.advantages,
                             config.clip_range, config.adv_clip)
    metrics["advantage_mean"] = jnp.mean(batch.advantages)
    if config.kl_beta > 0.0:
        if reference is None:
            raise ValueError("kl_beta > 0 needs the reference model: reference=(eps_fn, params)")
        reference_eps_fn, reference_params = reference
        reference_mean, _ = transition_mean(reference_eps_fn,
                                            jax.lax.stop_gradient(reference_params),
                                            schedule, *args)
        kl = jnp.mean(kernel_kl(mean, jax.lax.stop_gradient(reference_mean), std))
        loss = loss + config.kl_beta * kl
        metrics["kl_to_reference"] = jax.lax.stop_gradient(kl)
    return loss, metrics


def accumulated_gradient(loss_fn: Any, params: Any, micro_batches: Any,
                         unroll: int | bool = 1) -> tuple[jax.Array, dict, Any]:
    """The mean over micro-batches of ``loss_fn``'s gradient, one micro-batch at a time.

    Args:
      loss_fn: ``(params, micro_batch) -> (loss [], metrics)``.
      micro_batches: a pytree whose leaves have a leading axis A (A micro-batches).

    Returns:
      (mean loss, metrics: the mean over micro-batches, but ``log_ratio_max`` their max, mean
      gradient). A ``lax.scan`` (``unroll`` as ``rollout.resolve_unroll``: on CPU a
      differentiated loop runs far slower than its unrolled steps): one micro-batch's
      activations in memory at a time when it is a loop.
    """
    def step(grad_sum, micro_batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch)
        return jax.tree_util.tree_map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grad_sum, (losses, metrics) = jax.lax.scan(step, zeros, micro_batches, unroll=unroll)
    count = losses.shape[0]
    metrics = {name: jnp.max(value) if name == "log_ratio_max" else jnp.mean(value)
               for name, value in metrics.items()}
    return jnp.mean(losses), metrics, jax.tree_util.tree_map(lambda g: g / count, grad_sum)


def stochastic_steps(schedule: Schedule, eta: float) -> np.ndarray:
    """[S] int32 indices of the steps with sigma_i > 0 (host-side; needs a concrete schedule).

    With ``set_alpha_to_one`` the last DDIM step lands on alpha_bar = 1 and is deterministic.
    """
    _check_stochastic(eta)
    std = np.asarray(schedule.std(jnp.arange(schedule.num_steps), eta))
    return np.nonzero(std > 0)[0].astype(np.int32)


def transitions_from_trajectory(trajectory: Trajectory, advantages: jax.Array,
                                context: jax.Array, null_context: jax.Array,
                                steps: Optional[Sequence[int] | np.ndarray] = None,
                                reduce: str = "mean") -> DDPOBatch:
    """Flattens a sampled batch of chains into DDPO transitions, chain-major.

    Args:
      trajectory: B chains of T steps (``Trajectory.log_prob`` is summed over dimensions).
      advantages: [B] per-chain advantages (e.g. ``advantages.per_prompt_advantages``).
      context: [B, L, D] the prompts' embeddings used by the rollout; null_context: [1, L, D].
      steps: [S] step indices to keep (default: all T); ``stochastic_steps`` drops the
        deterministic ones.
      reduce: the reduction the loss will use; the stored log-probs are converted to it.

    Returns:
      A DDPOBatch of N = B * S transitions; transition b * S + s is step ``steps[s]`` of chain b.
    """
    _check_reduce(reduce)
    batch, num_steps = trajectory.log_prob.shape
    steps = np.arange(num_steps, dtype=np.int32) if steps is None else np.asarray(steps, np.int32)
    kept = steps.shape[0]
    sample_shape = trajectory.x_t.shape[2:]

    def flat(values: jax.Array) -> jax.Array:  # [B, T, ...] -> [B * S, ...]
        return values[:, steps].reshape((batch * kept,) + values.shape[2:])

    log_prob = _reduce_log_prob(flat(trajectory.log_prob), sample_shape, reduce)
    return DDPOBatch(
        x_t=flat(trajectory.x_t),
        x_prev=flat(trajectory.x_prev),
        step_index=jnp.tile(jnp.asarray(steps), batch),
        old_log_prob=log_prob,
        advantages=jnp.repeat(jnp.asarray(advantages, jnp.float32), kept),
        context=jnp.repeat(context, kept, axis=0),
        null_context=null_context,
    )


def plan_updates(rng: np.random.Generator, chains: int, steps: int, minibatch_size: int,
                 accumulation: int = 1, by_timestep: bool = True) -> list[np.ndarray]:
    """One pass over an epoch's transitions as optimiser steps (host side).

    Transition ``c * steps + s`` is stored step s of chain c (``transitions_from_trajectory``).
    Each optimiser step is an index array [A, M]: A micro-batches of M transitions whose
    gradients are averaged into one update.

    * ``by_timestep`` (ddpo-pytorch): the chains are shuffled and cut into minibatches of M
      chains; each chain visits its steps in its own random order, and micro-batch j of a
      minibatch holds step ``order_c[j]`` of each of its chains. An optimiser step accumulates
      every step of ``accumulation`` minibatches: A = steps * accumulation.
    * otherwise: the transitions are shuffled and cut into micro-batches of M (any chain, any
      step); an optimiser step accumulates ``accumulation`` of them: A = accumulation.

    Chains (or transitions) left over by the cuts are not trained on in this pass.
    """
    if minibatch_size < 1 or accumulation < 1:
        raise ValueError(f"minibatch_size = {minibatch_size} and accumulation = {accumulation} "
                         "must be >= 1")
    if by_timestep:
        order = rng.permutation(chains)
        step_orders = np.stack([rng.permutation(steps) for _ in range(chains)]) if chains else (
            np.zeros((0, steps), np.int64))
        groups = order[:chains // minibatch_size * minibatch_size].reshape(-1, minibatch_size)
        # [G, steps, M]: micro-batch j of group g is step step_orders[c, j] of each chain c.
        micro = groups[:, None, :] * steps + step_orders[groups].transpose(0, 2, 1)
        updates = micro.shape[0] // accumulation
        micro = micro[:updates * accumulation].reshape(updates, accumulation * steps,
                                                        minibatch_size)
    else:
        total = chains * steps
        order = rng.permutation(total)
        micro = order[:total // minibatch_size * minibatch_size].reshape(-1, minibatch_size)
        updates = micro.shape[0] // accumulation
        micro = micro[:updates * accumulation].reshape(updates, accumulation, minibatch_size)
    return [indices.astype(np.int64) for indices in micro]


def updates_per_pass(chains: int, steps: int, minibatch_size: int, accumulation: int = 1,
                     by_timestep: bool = True) -> int:
    """The number of optimiser steps ``plan_updates`` makes (without drawing anything)."""
    units = chains if by_timestep else chains * steps
    return (units // minibatch_size) // accumulation

