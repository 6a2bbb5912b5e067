"""Evaluation: fixed prompts and noise, every configured reward, and the eps distance to the
pretrained model along the evaluated policy's own trajectories."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax import prompts as prompts_lib
from vard_jax.diffusion import rollout as rollout_lib, sampler as sampler_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.training.trainer import Trainer


class EvalResult(NamedTuple):
    images: np.ndarray  # [N, H, W, 3]
    prompts: list[str]
    scores: dict[str, np.ndarray]  # reward name -> [N]
    eps_distance: float


def eval_eta(config) -> float:
    """The sampler's eta at evaluation: ``sample.eval_eta``, or ``sample.eta`` where it is -1."""
    return config.sample.eta if config.sample.eval_eta == -1.0 else config.sample.eval_eta


@functools.lru_cache(maxsize=8)
def _distance_sampler(trainer: Trainer, with_distance: bool = True):
    pipeline, config, policy = trainer.pipeline, trainer.config, trainer.policy
    spec = sampler_lib.SamplerSpec(trainer.num_steps, eval_eta(config),
                                   config.sample.guidance_scale)

    def fn(policy_params, reference_params, frozen, ids, key):
        def distance(info, context, null_context):  # of the sampler's (guided) predictions
            return rollout_lib.reference_eps_distance(
                policy.eps_fn, policy.reference_unet(reference_params), info, context,
                null_context, config.sample.guidance_scale, "guided")

        samples = sampler_lib.sample(pipeline, frozen, policy.unet(policy_params,
                                                                   reference_params),
                                     ids, key, spec, eps_fn=policy.eps_fn,
                                     step_hook=distance if with_distance else None)
        if not with_distance:
            return samples.images, jnp.zeros((), jnp.float32)
        return samples.images, jnp.mean(samples.hook_outputs)

    return jax.jit(fn)


def evaluate(trainer: Trainer, policy_params: Any, prompts: list[str], batch_size: int,
             seed: int, scored: bool = True, distance: bool = True) -> EvalResult:
    """Samples ``prompts`` in batches with noise fixed by ``seed`` (batch i: fold_in(PRNGKey(
    seed), i)) at the evaluation's eta (``eval_eta``); scores every reward (``scored=False``:
    none, ``scores`` is empty) and the distance to the pretrained model (``distance=False``:
    not computed, 0)."""
    fn = _distance_sampler(trainer, distance)
    images, distances = [], []
    for index, (batch, real) in enumerate(prompts_lib.padded_batches(prompts, batch_size)):
        ids = trainer.put_ids(batch)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        batch_images, distance = fn(policy_params, trainer.reference_params, trainer.frozen, ids,
                                    key)
        images.append(mesh_lib.to_host(batch_images)[:real])
        distances.append(float(distance))
    images = np.concatenate(images)
    return EvalResult(images=images, prompts=list(prompts),
                      scores=score_images(trainer, images, prompts) if scored else {},
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


def diversity_prompts(prompts: list[str], batch_size: int, repeats: int) -> list[str]:
    """One batch of the first distinct ``prompts``, each repeated ``repeats`` times in a row."""
    distinct = list(dict.fromkeys(prompts))[:max(1, batch_size // repeats)]
    return [p for p in distinct for _ in range(repeats)]


def diversity(images: np.ndarray, repeats: int) -> float:
    """Mean pairwise RMS pixel distance between images of one prompt (consecutive groups of
    ``repeats``; pixels in [0, 1]): 0 when every sample of a prompt is the same image."""
    groups = np.asarray(images, np.float64).reshape(-1, repeats, int(np.prod(images.shape[1:])))
    squared = ((groups[:, :, None] - groups[:, None, :]) ** 2).mean(-1)  # [P, R, R]
    upper = np.triu_indices(repeats, 1)
    return float(np.sqrt(squared[:, upper[0], upper[1]]).mean())


def summary(result: EvalResult, prefix: str = "eval") -> dict:
    out = {}
    for name, values in result.scores.items():
        out[f"{prefix}_{name}_mean"] = float(np.mean(values))
        out[f"{prefix}_{name}_std"] = float(np.std(values))
    out[f"{prefix}_eps_distance"] = result.eps_distance
    return out
