"""Deterministic weights for the reference checkpoints, from their PyTorch state-dict shapes.

The reference outputs in ``data/`` were computed by diffusers' and transformers' PyTorch
classes (``make_reference.py``) with exactly these weights, so the tests rebuild the same
checkpoint from the recorded key names and shapes without storing its weights or needing
PyTorch: every tensor is drawn from its own generator (seeded by the key), LayerNorm/GroupNorm
scales near 1, biases small, matrices and kernels scaled by 1/sqrt(fan-in).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

LOGIT_SCALE = 2.6592


def tensor(key: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if not shape:
        return np.asarray(LOGIT_SCALE, np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    if len(shape) == 1:
        if leaf == "weight":  # normalisation scale
            return 1.0 + 0.1 * noise
        return 0.1 * noise  # biases, class embedding
    fan_in = int(np.prod(shape[1:]))
    return noise / np.sqrt(fan_in)


def state_dict(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """{key: float32 array} for every key of ``shapes`` (a state dict's float tensors)."""
    return {key: tensor(key, shape, seed) for key, shape in shapes.items()}
