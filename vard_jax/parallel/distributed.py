"""Several processes (hosts) in one run: ``jax.distributed`` start-up from the config.

A run is multi-process when ``mesh.distributed`` is set or ``JAX_COORDINATOR_ADDRESS`` is in
the environment. Then ``initialize`` calls ``jax.distributed.initialize`` before anything else
touches a device. Whatever the config leaves unset comes from the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or from jax's cluster
detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes). Every process then runs the same
program over one global mesh of all processes' devices.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from vard_jax.config import check_distributed


class DistributedError(RuntimeError):
    """Multi-process start-up failed; the message is one line for the user."""


def requested(config) -> bool:
    return bool(config.mesh.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _env_int(name: str) -> Optional[int]:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"${name} = {text!r} is not an integer; unset it or give one") \
            from None


def initialize(config) -> bool:
    """Starts ``jax.distributed`` when the config or environment asks; True when multi-process.

    Call it before any other JAX call of the process. Raises ConfigError for malformed mesh
    fields and DistributedError when the start-up fails (one line each).
    """
    if not requested(config):
        return False
    check_distributed(config)
    if jax.distributed.is_initialized():
        return True
    mesh = config.mesh
    num_processes = mesh.num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = mesh.process_id if mesh.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") == "none":
        # CPU devices of different processes talk through gloo (jax's default since 0.5).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=mesh.coordinator_address or None,
                                   num_processes=num_processes, process_id=process_id)
    except Exception as error:  # noqa: BLE001 - jax raises several types; reported as one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistributedError(
            f"jax.distributed.initialize failed ({reason[:300]}); set mesh.coordinator_address, "
            "mesh.num_processes and mesh.process_id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or run where jax detects the cluster (TPU pod, "
            "SLURM, Open MPI)") from error
    return True
