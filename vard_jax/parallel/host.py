"""Split a CPU host into several XLA devices, so that the data axis uses every core.

XLA:CPU runs a convolution on one thread (docs/BENCHMARKS.md measures it: a 3x3 convolution
takes the same time on 1 or 2 cores, a large matmul halves), so a single CPU device leaves the
other cores of a CPU-only machine mostly idle while the UNet runs. Several host devices put the
batch's shards on different cores through the project's own data-parallel sharding
(``config.mesh``). On 2 cores this makes sampling 1.7x and the VARD policy step 1.3x faster.

The count is JAX's ``jax_num_cpu_devices`` option, set in this process only (subprocesses
and the environment are left alone). It is fixed when the CPU backend starts, so
``configure`` must run before anything touches a device (``vard_jax.main`` calls it first).
A count the user already chose wins: ``JAX_NUM_CPU_DEVICES``, or
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional

from vard_jax.config import data_sharded_batches
from vard_jax.parallel import distributed

#: What a user sets to choose the count themselves; either wins over ``configure``.
FLAG = "--xla_force_host_platform_device_count"
ENV_VARIABLE = "JAX_NUM_CPU_DEVICES"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_devices(config, cores: int) -> int:
    """The largest count <= ``cores`` that divides every batch the data axis shards.

    Only for the default mesh (all devices on the data axis) of a single process; an explicit
    ``mesh.data``/``mesh.fsdp`` or a multi-process run gets 1 (set ``mesh.cpu_devices``).
    """
    if config.mesh.fsdp != 1 or config.mesh.data != -1 or distributed.requested(config):
        return 1  # an explicit mesh or a multi-process run keeps the devices it names
    common = math.gcd(*data_sharded_batches(config).values())
    for count in range(min(cores, common), 0, -1):
        if common % count == 0:
            return count
    return 1


def device_count(config, cores: Optional[int] = None) -> int:
    """Host devices ``configure`` asks for: ``mesh.cpu_devices``, or the automatic choice (0)."""
    requested = int(config.mesh.cpu_devices)
    if requested >= 1:
        return requested
    return auto_devices(config, available_cores() if cores is None else cores)


def planned_count(config, environ: Optional[Mapping[str, str]] = None,
                  cores: Optional[int] = None) -> Optional[int]:
    """The host device count ``configure`` sets, or None when the process keeps its devices:
    the count is 1 (XLA's own default) or the user named one (``JAX_NUM_CPU_DEVICES``, or
    the device-count flag in ``XLA_FLAGS``)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VARIABLE, "").strip() or FLAG in environ.get("XLA_FLAGS", ""):
        return None
    count = device_count(config, cores)
    return count if count > 1 else None


def configure(config, environ: Optional[Mapping[str, str]] = None,
              cores: Optional[int] = None) -> Optional[int]:
    """Sets ``jax_num_cpu_devices`` to ``planned_count``; returns it, or None when unchanged.

    Only the CPU platform reads it: on a machine with accelerators it changes nothing that
    training uses.
    """
    return set_device_count(planned_count(config, environ, cores))


def set_device_count(count: Optional[int]) -> Optional[int]:
    """Sets ``jax_num_cpu_devices`` to ``count`` (None: leaves it); returns ``count``."""
    if count is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", count)
    return count
