"""DDPO's advantages: each chain's final reward standardised by its prompt's statistics, in
one batch or over a buffer that keeps each prompt's last rewards across epochs (as
ddpo-pytorch's per-prompt stat tracking does). Host side, numpy."""

from __future__ import annotations

import collections
from typing import Sequence, Union

import numpy as np


def per_prompt_advantages(rewards: np.ndarray | Sequence[float],
                          prompt_ids: Union[Sequence[str], np.ndarray],
                          min_count: int = 2, eps: float = 1e-6) -> np.ndarray:
    """Rewards standardised per prompt, on the host (numpy in, numpy float32 out).

    Args:
      rewards: [N] final rewards of N chains.
      prompt_ids: [N] the prompt of each chain (strings or integer ids).
      min_count: prompts with fewer samples than this use the batch's global mean and std
        (a single sample would otherwise always get advantage 0).
      eps: added to the standard deviation.

    Returns:
      [N] float32 advantages: (r - mean_p) / (std_p + eps), with population std (ddof = 0).
    """
    values = np.asarray(rewards, np.float64).reshape(-1)
    ids = np.asarray(prompt_ids).reshape(-1)
    if ids.shape[0] != values.shape[0]:
        raise ValueError(f"{values.shape[0]} rewards but {ids.shape[0]} prompt ids")
    if values.size == 0:
        return np.zeros((0,), np.float32)
    global_mean, global_std = values.mean(), values.std()
    advantages = (values - global_mean) / (global_std + eps)
    _, groups, counts = np.unique(ids, return_inverse=True, return_counts=True)
    groups = groups.reshape(-1)
    for group, count in enumerate(counts):
        if count < min_count:
            continue
        members = groups == group
        group_values = values[members]
        advantages[members] = (group_values - group_values.mean()) / (group_values.std() + eps)
    return advantages.astype(np.float32)


class PromptStatTracker:
    """Per-prompt reward statistics across epochs, for DDPO's advantages (host side).

    Each prompt keeps the last ``buffer_size`` rewards it received, over all epochs so far.
    ``advantages`` first appends the batch's rewards to their prompts' buffers, then
    standardises each reward with its prompt's buffer, or with the batch's own mean and std
    while the buffer holds fewer than ``min_count`` rewards (ddpo-pytorch's per-prompt stat
    tracking; its defaults are 16 and 16). ``buffer_size = 0`` keeps nothing between calls:
    each batch's own rewards of the prompt are its statistics (``per_prompt_advantages``).

    The buffers are part of a run's state: ``state_dict``/``load_state_dict`` (JSON-ready, the
    rewards as Python floats) carry them through checkpoints, so a resumed run computes the
    same advantages as an uninterrupted one.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 0 or min_count < 1:
            raise ValueError(f"stat tracker buffer_size = {buffer_size} (>= 0) and min_count = "
                             f"{min_count} (>= 1)")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[str, collections.deque] = {}

    def advantages(self, rewards: np.ndarray | Sequence[float],
                   prompts: Sequence[str]) -> np.ndarray:
        """[N] float32 advantages of N rewards, ``prompts[i]`` the prompt of reward i."""
        values = np.asarray(rewards, np.float64).reshape(-1)
        ids = np.asarray(list(prompts), dtype=object).reshape(-1)
        if ids.shape[0] != values.shape[0]:
            raise ValueError(f"{values.shape[0]} rewards but {ids.shape[0]} prompts")
        if self.buffer_size == 0:
            return per_prompt_advantages(values, ids.astype(str), self.min_count, self.eps)
        if values.size == 0:
            return np.zeros((0,), np.float32)
        global_mean, global_std = values.mean(), values.std()
        advantages = np.empty_like(values)
        for prompt in dict.fromkeys(ids.tolist()):  # each prompt once, in order of appearance
            members = ids == prompt
            buffer = self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(values[members].tolist())
            if len(buffer) < self.min_count:
                mean, std = global_mean, global_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[members] = (values[members] - mean) / (std + self.eps)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {prompt: collections.deque((float(v) for v in values),
                                                  maxlen=self.buffer_size)
                        for prompt, values in state.items()}


def group_advantages(rewards: np.ndarray | Sequence[float], group_size: int,
                     global_std: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Flow-GRPO's advantages: each reward minus the mean of its group (``group_size``
    consecutive samples of one prompt), divided by the standard deviation of all rewards
    (``global_std``) or of its group, plus ``eps``."""
    rewards = np.asarray(rewards, np.float64)
    if group_size < 1 or rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards are not whole groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    std = groups.std() if global_std else groups.std(axis=1, keepdims=True)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (std + eps)).reshape(-1).astype(
        np.float32)
