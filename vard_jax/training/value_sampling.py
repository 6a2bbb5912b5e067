"""Sampling with a run's value: value guidance, value-steered SMC and best-of-N.

The math is in ``vard_jax.diffusion.steering``; this binds it to a built ``Trainer`` (its
pipeline, policy, value model and shardings). The value may come from the same run as the
policy or steer the pretrained model (a value trained with ``config.algorithm = "value"``
or by any VARD run).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax import prompts as prompts_lib
from vard_jax.diffusion import sampler as sampler_lib, steering as steering_lib
from vard_jax.parallel import mesh as mesh_lib

SteeringSpec = sampler_lib.SteeringSpec


class SteeredBatch(NamedTuple):
    """Host arrays of one steered batch, prompt-major ([P * N, ...])."""

    images: np.ndarray  # [P * N, H, W, 3]
    prompts: list[str]  # [P * N] the prompt of each row
    log_weights: np.ndarray  # [P * N]
    final_value: np.ndarray  # [P * N] V(x_0)
    ess: np.ndarray  # [T, P]
    resampled: np.ndarray  # [T, P] bool


SELECTIONS = ("auto", "weight", "value", "reward")


def resolve_selection(select: str, steering: SteeringSpec) -> str:
    """The particle a prompt's image is taken from: ``auto`` = drawn by the final SMC weights
    when particles are resampled, else the highest final value (best-of-N by V)."""
    if select not in SELECTIONS:
        raise ValueError(f"--select={select}: use one of {', '.join(SELECTIONS)}")
    if select == "auto":
        return "weight" if steering.resample_every and steering.particles > 1 else "value"
    return select


def check_steering(steering: SteeringSpec, eta: float) -> None:
    """Raises ValueError (one line) for settings that cannot work."""
    if steering.particles < 1:
        raise ValueError(f"particles = {steering.particles}: must be >= 1")
    if steering.temperature <= 0:
        raise ValueError(f"temperature = {steering.temperature}: must be > 0")
    if steering.resample_every < 0:
        raise ValueError(f"resample_every = {steering.resample_every}: use 0 (never) or >= 1")
    if not 0.0 <= steering.ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold = {steering.ess_threshold}: must be in [0, 1]")
    if steering.particles > 1 and steering.resample_every and eta <= 0.0:
        raise ValueError("value-steered sampling resamples particles, which a deterministic "
                         "sampler (eta 0) never separates again; set sample.eval_eta > 0 (or -1: "
                         "sample.eta)")


class ValueSampler:
    """``sample(policy_params, value_params, reward_stats, prompts, key)`` -> SteeredBatch."""

    def __init__(self, trainer, steering: SteeringSpec):
        from vard_jax.training.evaluation import eval_eta

        config = trainer.config
        eta = eval_eta(config)  # the evaluation's sampler, steered
        check_steering(steering, eta)
        self.trainer, self.steering = trainer, steering
        pipeline, policy, value_model = trainer.pipeline, trainer.policy, trainer.value_model
        spec = sampler_lib.SamplerSpec(config.sample.num_steps, eta,
                                       config.sample.guidance_scale)

        def fn(policy_params, value_params, stats, frozen, reference_params, ids, reward_ids,
               key):
            aux = trainer.value_aux(stats, frozen, reference_params, reward_ids)

            def value_fn(x, timesteps, context):
                return value_model.apply(value_params, x, timesteps, context, aux)

            return sampler_lib.steered_sample(pipeline, frozen,
                                              policy.unet(policy_params, reference_params), ids,
                                              key, spec, steering, value_fn,
                                              eps_fn=policy.eps_fn)

        self._fn = jax.jit(fn)

    def sample(self, policy_params: Any, value_params: Any, reward_stats: Any,
               prompts: Sequence[str], key: jax.Array) -> SteeredBatch:
        """``steering.particles`` images for each prompt (P prompts; P * N a multiple of the
        data axis)."""
        trainer, n = self.trainer, self.steering.particles
        rows = [p for p in prompts for _ in range(n)]  # prompt-major, split over the data axis
        ids = trainer.put_batch(jnp.asarray(trainer.pipeline.tokenize(rows)))
        reward_ids = None
        if trainer.value_needs_reward_ids:
            reward_ids = trainer.put_batch(jnp.asarray(trainer.reward.prepare(rows)))
        out = self._fn(policy_params, value_params, reward_stats, trainer.frozen,
                       trainer.reference_params, ids, reward_ids, trainer.put_key(key))
        host = [mesh_lib.to_host(a) for a in out]
        images, log_weights, final_value, ess, resampled = host
        return SteeredBatch(images=images, prompts=rows,
                            log_weights=log_weights, final_value=final_value, ess=ess,
                            resampled=resampled)


def sample_all(sampler: ValueSampler, policy_params: Any, value_params: Any, reward_stats: Any,
               prompts: Sequence[str], prompts_per_batch: int, seed: int) -> SteeredBatch:
    """``sampler.sample`` over ``prompts`` in batches of ``prompts_per_batch`` prompts (batch
    i with the key ``fold_in(PRNGKey(seed), i)``; the last batch padded with its first prompt,
    the padding dropped), as one SteeredBatch."""
    key, n = jax.random.PRNGKey(seed), sampler.steering.particles
    parts = []
    for index, (batch, kept) in enumerate(prompts_lib.padded_batches(prompts,
                                                                      prompts_per_batch)):
        out = sampler.sample(policy_params, value_params, reward_stats, batch,
                             jax.random.fold_in(key, index))
        rows = kept * n
        parts.append(SteeredBatch(out.images[:rows], out.prompts[:rows], out.log_weights[:rows],
                                  out.final_value[:rows], out.ess[:, :kept],
                                  out.resampled[:, :kept]))
    return SteeredBatch(np.concatenate([b.images for b in parts]),
                        [p for b in parts for p in b.prompts],
                        np.concatenate([b.log_weights for b in parts]),
                        np.concatenate([b.final_value for b in parts]),
                        np.concatenate([b.ess for b in parts], axis=1),
                        np.concatenate([b.resampled for b in parts], axis=1))


def select(batch: SteeredBatch, particles: int, by: str, rewards: np.ndarray | None = None,
           key: jax.Array | None = None) -> np.ndarray:
    """Row indices of one image per prompt: ``by`` = "weight" (drawn in proportion to the
    final SMC weights; needs ``key``), "value" (highest V(x_0)) or "reward" (highest
    ``rewards``)."""
    if by == "weight":
        if key is None:
            raise ValueError("select(by='weight') draws: give a key")
        return np.asarray(steering_lib.draw_one(key, jnp.asarray(batch.log_weights), particles))
    if by == "value":
        return steering_lib.best_of(batch.final_value, particles)
    if by == "reward":
        if rewards is None:
            raise ValueError("select(by='reward') needs the rewards of the rows")
        return steering_lib.best_of(rewards, particles)
    raise ValueError(f"select by {by!r}: use weight, value or reward")


def unet_calls_per_image(config, steering: SteeringSpec) -> int:
    """UNet evaluations behind one output image (classifier-free guidance doubles a step)."""
    per_step = 1 if config.sample.guidance_scale == 1.0 else 2
    return config.sample.num_steps * per_step * steering.particles


def evaluate_steered(loaded, steering: SteeringSpec, select_by: str, prompts: Sequence[str],
                     prompts_per_batch: int, seed: int) -> tuple[dict, dict]:
    """Steered samples of ``prompts`` scored by every configured reward.

    Returns (scores of the chosen image of each prompt, name -> [P]; figures of the
    steering: UNet calls per image, the chosen images' mean final value, how often particles
    were resampled, the smallest effective sample size, and for several particles each
    reward's mean over all particles under their final weights, the expectation under the
    steered distribution that the chosen images estimate).
    """
    from vard_jax.training import evaluation

    trainer, n = loaded.trainer, steering.particles
    sampler = ValueSampler(trainer, steering)
    batch = sample_all(sampler, loaded.policy_params, loaded.value_params, loaded.reward_stats,
                       prompts, prompts_per_batch, seed)
    every = evaluation.score_images(trainer, batch.images, batch.prompts)
    rows = select(batch, n, select_by, every[trainer.reward.name],
                  jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    scores = {name: values[rows] for name, values in every.items()}
    extra = {"unet_calls_per_image": unet_calls_per_image(trainer.config, steering),
             "final_value_mean": float(np.mean(batch.final_value[rows])),
             "resampled_fraction": float(np.mean(batch.resampled[:-1])) if n > 1 else 0.0,
             "min_ess": float(np.min(batch.ess)) if n > 1 else 1.0}
    if n > 1:
        extra["weighted_means"] = {
            name: float(np.mean(steering_lib.weighted_mean(values, batch.log_weights, n)))
            for name, values in every.items()}
    return scores, extra
