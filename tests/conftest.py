"""Test-session settings shared by every test module and the subprocesses they start.

XLA compiles dominate the suite's time on CPU, and many tests (and the entry-point
subprocesses) compile identical computations: JAX's persistent compilation cache, keyed by
the exact computation and the library versions, serves repeats from disk. It lives in the
checkout (``.cache/jax_tests``, git-ignored), so a second run is faster still. The suite runs
in two pytest-xdist workers (``-n 2 --dist loadfile`` in setup.cfg: a module's tests and
fixtures stay in one worker) that share the cache under its file lock.
"""

import os
import pathlib

CACHE_DIR = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax_tests"

# Environment variables, so that subprocesses (python -m vard_jax.main ...) inherit them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# A size limit turns on the cache's file lock: pytest-xdist workers share the directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

# One CPU device per test process and per subprocess it starts (python -m vard_jax.main would
# otherwise split the cores, vard_jax/parallel/host.py): the two xdist workers already use both
# cores, and subprocesses then compile what the in-process tests cached. test_parallel and
# test_host set their own device counts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=1").strip()

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_compilation_cache_max_size",
                  int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
