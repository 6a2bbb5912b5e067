"""Evaluation: fixed prompts and noise, every configured reward, and the eps distance to the
pretrained model along the evaluated policy's own trajectories."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import rollout as rollout_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training.trainer import Trainer


class EvalResult(NamedTuple):
    images: np.ndarray  # [N, H, W, 3]
    prompts: list[str]
    scores: dict[str, np.ndarray]  # reward name -> [N]
    eps_distance: float


@functools.lru_cache(maxsize=8)
def _distance_sampler(trainer: Trainer):
    pipeline, schedule, config = trainer.pipeline, trainer.schedule, trainer.config
    policy = trainer.policy

    def fn(policy_params, reference_params, frozen, ids, key):
        context = pipeline.encode_ids(frozen["text_encoder"], ids)
        null_context = pipeline.encode_ids(frozen["text_encoder"], trainer.null_ids)
        batch = ids.shape[0]
        x_T, noise = rollout_lib.sample_noise(key, batch, trainer.num_steps, pipeline.sample_shape)

        def hook(info):
            return rollout_lib.reference_eps_distance(policy.eps_fn,
                                                      policy.reference_unet(reference_params), info,
                                                      context, null_context,
                                                      config.sample.guidance_scale,
                                                      "guided")  # the sampler's predictions

        trajectory, distances = rollout_lib.rollout(
            policy.eps_fn, policy.unet(policy_params, reference_params), schedule, x_T, noise,
            context, null_context,
            eta=config.sample.eta, guidance_scale=config.sample.guidance_scale, step_hook=hook)
        return pipeline.decode(frozen, trajectory.x0), jnp.mean(distances)

    return jax.jit(fn)


def evaluate(trainer: Trainer, policy_params: Any, prompts: list[str], batch_size: int,
             seed: int) -> EvalResult:
    """Samples ``prompts`` in batches with noise fixed by ``seed``; scores every reward."""
    fn = _distance_sampler(trainer)
    images, distances = [], []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        pad = batch_size - len(chunk)
        ids = trainer.put_batch(jnp.asarray(trainer.pipeline.tokenize(chunk + chunk[:1] * pad)))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        batch_images, distance = fn(policy_params, trainer.reference_params, trainer.frozen, ids,
                                    key)
        images.append(mesh_lib.to_host(batch_images)[:len(chunk)])
        distances.append(float(distance))
    images = np.concatenate(images)
    return EvalResult(images=images, prompts=list(prompts),
                      scores=score_images(trainer, images, prompts),
                      eps_distance=float(np.mean(distances)))


def score_images(trainer: Trainer, images: np.ndarray, prompts: list[str]) -> dict:
    """Every configured reward of host images: the trained one, its parts, the evaluation
    extras (name -> [N])."""
    total, parts = trainer.reward_evaluator(images, prompts)
    scores = dict(parts)
    scores[trainer.reward.name] = total
    for name, evaluator in trainer.eval_evaluators.items():
        scores[name] = evaluator(images, prompts)[0]
    return scores


def summary(result: EvalResult, prefix: str = "eval") -> dict:
    out = {}
    for name, values in result.scores.items():
        out[f"{prefix}_{name}_mean"] = float(np.mean(values))
        out[f"{prefix}_{name}_std"] = float(np.std(values))
    out[f"{prefix}_eps_distance"] = result.eps_distance
    return out
