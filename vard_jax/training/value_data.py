"""The value's training data: every state of the sampled chains labelled with its chain's
standardised reward, replay over epochs, batches of it, and how well V fits it (explained
variance, overall and per quarter of the denoising steps). Host-side numpy."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from vard_jax.training.state import RewardStats

EV_BUCKETS = 4  # explained variance of V is reported per quarter of the denoising steps


def explained_variance(targets: np.ndarray, predictions: np.ndarray) -> float:
    """1 - Var(targets - predictions) / Var(targets); NaN when the targets do not vary."""
    if targets.size == 0:
        return float("nan")
    variance = float(np.var(targets))
    if variance < 1e-12:
        return float("nan")
    return 1.0 - float(np.var(targets - predictions)) / variance


def dataset(states: np.ndarray, context: np.ndarray, rewards: np.ndarray, stats: RewardStats,
            prev_timesteps: np.ndarray, reward_ids: Optional[np.ndarray] = None) -> dict:
    """Every state after a step, labelled with its chain's standardised reward.

    ``states`` [N, T, ...] (x_{i-1} after each step i), ``context`` [N, L, D], ``rewards``
    [N], ``prev_timesteps`` [T] (the timestep of each state); ``reward_ids`` [N, ...] the
    reward's prompt ids, for the values that read the reward's network."""
    n, t = states.shape[:2]
    targets = np.asarray(stats.standardise(jnp.asarray(rewards)))  # [N]
    data = {
        "states": states.reshape((n * t,) + states.shape[2:]),
        "timesteps": np.tile(np.asarray(prev_timesteps), n),  # int32 (float32: flow models)
        "step_index": np.tile(np.arange(t), n),
        "chain": np.repeat(np.arange(n), t),
        "context": context,
        "targets": np.repeat(targets, t).astype(np.float32),
        "rewards": np.repeat(np.asarray(rewards, np.float32), t),  # raw, for replay
    }
    if reward_ids is not None:
        data["reward_ids"] = reward_ids  # per chain
    return data


def replay(datasets: list[dict], stats: RewardStats) -> dict:
    """The ``dataset``s of several epochs as one, every target standardised again with
    ``stats`` (the current statistics: V predicts the reward in today's units)."""
    merged: dict[str, list] = {}
    chains = 0
    for data in datasets:
        for key, value in data.items():
            merged.setdefault(key, []).append(value + chains if key == "chain" else value)
        chains += data["context"].shape[0]
    out = {key: np.concatenate(values) for key, values in merged.items()}
    out["targets"] = np.asarray(stats.standardise(jnp.asarray(out["rewards"])), np.float32)
    return out


def batch(data: dict, idx: np.ndarray) -> dict:
    """The states ``idx`` of ``data`` with their chains' context (and reward ids), unplaced."""
    chains = data["chain"][idx]
    out = {"states": data["states"][idx], "timesteps": data["timesteps"][idx],
           "context": data["context"][chains], "targets": data["targets"][idx]}
    if "reward_ids" in data:
        out["reward_ids"] = data["reward_ids"][chains]
    return out


def per_state(function: Callable[[dict], np.ndarray], data: dict, batch_size: int,
              data_axis: int, extra: Optional[dict] = None) -> np.ndarray:
    """``function(batch) -> [B]`` (host values) over every state of ``data``, in batches of
    ``batch_size`` (the last one padded to the same size, divisible by ``data_axis``: one
    compiled program); ``extra`` holds more per-state inputs of the batch. Returns [N]."""
    total = data["states"].shape[0]
    chunk = max(min(batch_size, total), 1)
    size = chunk + (-chunk) % data_axis
    values = []
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total))
        idx_padded = np.concatenate([idx, np.repeat(idx[-1:], size - len(idx))])
        inputs = batch(data, idx_padded)
        for name, per in (extra or {}).items():
            inputs[name] = per[idx_padded]
        values.append(np.asarray(function(inputs))[:len(idx)])
    return np.concatenate(values)


def quarters(data: dict, num_steps: int) -> np.ndarray:
    """The step quarter (0 = the noisiest) of each state of ``data``."""
    return np.minimum(data["step_index"] * EV_BUCKETS // num_steps, EV_BUCKETS - 1)


def fit_metrics(targets: np.ndarray, predictions: np.ndarray, buckets: np.ndarray) -> dict:
    """Explained variance of ``predictions`` overall and per step quarter, and their MSE."""
    metrics = {"value_explained_variance": explained_variance(targets, predictions),
               "value_mse_before_update": float(np.mean((targets - predictions) ** 2))}
    for b in range(EV_BUCKETS):
        sel = buckets == b
        metrics[f"value_ev_q{b + 1}"] = explained_variance(targets[sel], predictions[sel])
    return metrics


def cosine_metrics(cosines: np.ndarray, buckets: np.ndarray) -> dict:
    """The mean cosine between V's and the reward's gradients, overall and per step quarter,
    and the fraction of states where it is positive."""
    metrics = {"value_grad_cosine": float(np.mean(cosines)),
               "value_grad_cosine_positive": float(np.mean(cosines > 0))}
    for b in range(EV_BUCKETS):
        metrics[f"value_grad_cosine_q{b + 1}"] = float(np.mean(cosines[buckets == b]))
    return metrics
