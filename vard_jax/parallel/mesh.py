"""The device mesh and the sharding rules of parameters and batches.

Axes: ``data`` (the batch is split along it) and ``fsdp`` (large parameter and optimiser
leaves are split along it). Rules, in order:
  1. leaves smaller than ``min_shard_size`` elements are replicated;
  2. otherwise the largest dimension divisible by the fsdp size is sharded along ``fsdp``;
  3. leaves with no such dimension are replicated.

Devices are laid out in ``jax.devices()`` order, ``fsdp`` varying fastest, so an fsdp group
stays on one host when it fits. With several processes (``jax.distributed``) the arrays are
global: ``put`` places values that every process holds identically, and ``to_host`` brings a
global array back to every process as numpy.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vard_jax.config import ConfigError, mesh_shape

DATA, FSDP = "data", "fsdp"


def make_mesh(config, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp = mesh_shape(config, len(devices))
    if jax.process_count() > 1 and data * fsdp != len(devices):
        raise ConfigError(f"config.mesh = (data={config.mesh.data}, fsdp={config.mesh.fsdp}) uses "
                          f"{data * fsdp} of the {len(devices)} devices of {jax.process_count()} "
                          "processes; a multi-process mesh must use them all (set one axis to -1)")
    grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """[A, M, ...] stacks of A micro-batches: the M axis split over ``data``, the rest replicated."""
    return NamedSharding(mesh, P(None, DATA))


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


def put(tree: Any, shardings: Any) -> Any:
    """Places a pytree whose values every process holds identically onto global shardings.

    ``shardings`` is one sharding or a matching pytree. One process: ``jax.device_put``.
    Several: each process copies only the slices its own devices hold (no cross-process check
    or transfer); leaves that are already global arrays are resharded by ``jax.device_put``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(put, tree, shardings)

    def put_leaf(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, shardings)
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, shardings, lambda index: value[index])

    return jax.tree_util.tree_map(put_leaf, tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly global) arrays, the whole value on every process.

    Arrays spread over other processes' devices are all-gathered (a collective: every process
    must call it); others are copied from local devices.
    """
    def fetch(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)
