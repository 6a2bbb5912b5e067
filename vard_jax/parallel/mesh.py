"""The device mesh and the sharding rules of parameters and batches.

Axes: ``data`` (the batch is split along it) and ``fsdp`` (large parameter and optimiser
leaves are split along it). Rules, in order:
  1. leaves smaller than ``min_shard_size`` elements are replicated;
  2. otherwise the largest dimension divisible by the fsdp size is sharded along ``fsdp``;
  3. leaves with no such dimension are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vard_jax.config import mesh_shape

DATA, FSDP = "data", "fsdp"


def make_mesh(config, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp = mesh_shape(config, len(devices))
    grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def leaf_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int = 2**14) -> P:
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def param_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by the rules above."""
    fsdp_size = mesh.shape[FSDP]

    def rule(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, leaf_spec(shape, fsdp_size))

    return jax.tree_util.tree_map(rule, tree)
