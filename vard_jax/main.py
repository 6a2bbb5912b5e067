"""Fine-tune a text-to-image diffusion model toward a reward with VARD.

    python -m vard_jax.main --config=configs/shapes.py --workdir=runs/demo
    python -m vard_jax.main --config=configs/shapes.py --config.train.seed=3 --workdir=DIR

Re-running the same command resumes from the latest checkpoint under WORKDIR/checkpoints.
SIGTERM stops it after the current epoch with a checkpoint (exit status 0). Exit status 2: bad
input (config, workdir, prompts, checkpoint, reward); 3: training diverged (non-finite updates).
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags, logging
from ml_collections import config_flags

from vard_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, samples and checkpoints.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --config=... --workdir=...")
    if _CONFIG.value is None:
        cli.fail("--config is required, e.g. --config=configs/shapes.py")
    if not _WORKDIR.value:
        cli.fail("--workdir is required, e.g. --workdir=runs/demo")
    config = cli.config_or_fail(_CONFIG)
    from vard_jax.parallel import host

    host.configure(config)  # before the CPU backend starts (XLA_FLAGS)
    import jax

    from vard_jax.config import ConfigError, validate
    from vard_jax.parallel import distributed

    try:
        distributed.initialize(config)  # before anything touches a device
    except (ConfigError, distributed.DistributedError) as error:
        cli.fail(str(error))
    try:
        validate(config, jax.device_count())
    except ConfigError as error:
        cli.fail(str(error))
    if jax.default_backend() == "cpu":
        logging.info("%d CPU device(s) (config.mesh.cpu_devices = %d, XLA_FLAGS = %r)",
                     jax.local_device_count(), config.mesh.cpu_devices,
                     os.environ.get("XLA_FLAGS", ""))
    workdir = pathlib.Path(_WORKDIR.value)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        cli.fail(f"workdir {workdir} is not writable ({error.strerror}); choose another --workdir")

    from vard_jax.rewards.registry import RewardError
    from vard_jax.training.checkpoints import CheckpointError
    from vard_jax.training.faults import NonFiniteError
    from vard_jax.training.loop import Loop

    try:
        loop = Loop(config, workdir)
    except (FileNotFoundError, ValueError) as error:
        cli.fail(str(error).splitlines()[0])
    try:
        rows = loop.run()
    except (CheckpointError, RewardError) as error:
        cli.fail(str(error).splitlines()[0])
    except NonFiniteError as error:  # the last good checkpoint is kept; see docs/RELIABILITY.md
        cli.fail(str(error), status=3)
    if rows:
        final = rows[-1]
        keys = [k for k in final if k.startswith("eval_") and k.endswith("_mean")]
        print(json.dumps({"step": final["step"], **{k: final[k] for k in keys},
                          "wall_s": round(final["wall_s"], 1)}))


if __name__ == "__main__":
    cli.run(main)
