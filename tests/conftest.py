"""Test-session settings shared by every test module and the subprocesses they start.

A fresh environment every run. The suite must pass on a new machine exactly as on a used one,
so nothing it reads may come from a user's caches: the first process of a run (the pytest
controller) makes one scratch directory and points every cache and home directory at it:
``HOME``, ``XDG_CACHE_HOME``/``XDG_CONFIG_HOME``, matplotlib's ``MPLCONFIGDIR`` (its font
cache is built there, as on a new machine), Hugging Face's ``HF_HOME`` (no cached hub
snapshots; ``HF_HUB_OFFLINE=1``) and JAX's persistent compilation cache. The pytest-xdist
workers and every subprocess a test starts inherit these variables, so they share the one
scratch directory, which the controller deletes at the end of the run.

XLA compiles dominate the suite's time on CPU, and many tests (and the entry-point
subprocesses) compile identical computations: the compilation cache, keyed by the exact
computation and the library versions, serves repeats within the run from disk. The suite runs
in two pytest-xdist workers (``-n 2 --dist loadfile`` in setup.cfg: a module's tests and
fixtures stay in one worker) that share the cache under its file lock. A developer who wants
compiled programs kept between runs sets ``VARD_TESTS_JAX_CACHE=/some/dir`` (results do not
depend on it; only the time does).
"""

import os
import pathlib
import shutil
import tempfile

import pytest

_SCRATCH_VARIABLE = "VARD_TESTS_SCRATCH"
_OWNER = _SCRATCH_VARIABLE not in os.environ  # this process made the scratch directory
if _OWNER:
    os.environ[_SCRATCH_VARIABLE] = tempfile.mkdtemp(prefix="vard-jax-tests-")
SCRATCH = pathlib.Path(os.environ[_SCRATCH_VARIABLE])

# Environment variables, so that subprocesses (python -m vard_jax.main ...) inherit them.
for variable, folder in (("HOME", "home"), ("XDG_CACHE_HOME", "home/.cache"),
                         ("XDG_CONFIG_HOME", "home/.config"), ("MPLCONFIGDIR", "matplotlib"),
                         ("HF_HOME", "huggingface"), ("TORCH_HOME", "torch")):
    os.environ[variable] = str(SCRATCH / folder)
    (SCRATCH / folder).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"  # no network in tests: never wait on the hub
CACHE_DIR = pathlib.Path(os.environ.get("VARD_TESTS_JAX_CACHE", SCRATCH / "jax_cache"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_DIR)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
# A size limit turns on the cache's file lock: pytest-xdist workers share the directory.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

# One CPU device per test process and per subprocess it starts (python -m vard_jax.main would
# otherwise split the cores, vard_jax/parallel/host.py): the two xdist workers already use both
# cores, and subprocesses then compile what the in-process tests cached. test_parallel and
# test_host set their own device counts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=1").strip()

# XLA's CPU backend compiles at LLVM -O0: the suite's time is mostly compiling programs that
# then run for milliseconds, and -O0 cuts the compiles by about a third (configs/pickscore.py's
# tiny end-to-end test: 120 s -> 82 s alone on 2 cores). Programs compute the same functions;
# they run slower, which the suite's short runs do not feel. Subprocesses inherit the flag.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_compilation_cache_max_size",
                  int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


@pytest.fixture(scope="session")
def fidelity_trainer():
    """The Trainer of ``tests.tiny_runs.fidelity_config()``, compiled once per worker."""
    from tests.tiny_runs import fidelity_config
    from vard_jax.training.trainer import Trainer

    return Trainer(fidelity_config())


# The longest modules (by pytest --durations on 2 cores), started first. With --dist loadfile the
# workers take whole modules in collection order as they become free; a long module taken last
# leaves the other worker idle for its whole length.
LONGEST_FIRST = ("test_reliability.py", "test_stable_diffusion.py", "test_entry_points.py",
                 "test_algorithms.py", "test_assets.py", "test_diffusion.py",
                 "test_vard_losses.py", "test_baselines.py")
# Started last: the notebook's kernel compiles the programs of test_entry_points' tiny run
# (the same config and batch sizes); after that module they come from the compilation cache.
LAST = ("test_notebook.py",)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    rank.update({name: len(LONGEST_FIRST) + 1 + position for position, name in enumerate(LAST)})
    # stable sort: modules without a rank keep their order, between the two lists
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


def pytest_unconfigure(config):
    """The controller deletes the run's scratch directory (workers have exited by then)."""
    if _OWNER and not hasattr(config, "workerinput"):
        shutil.rmtree(SCRATCH, ignore_errors=True)
