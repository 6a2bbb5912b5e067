"""Fine-tune a text-to-image diffusion model toward a reward with VARD.

    python -m vard_jax.main --config=configs/shapes.py --workdir=runs/demo
    python -m vard_jax.main --config=configs/shapes.py --config.train.seed=3 --workdir=DIR

Re-running the same command resumes from the latest checkpoint under WORKDIR/checkpoints
(with the same settings; --allow_changes=FIELD,... for deliberate changes). One run at a time
per workdir (WORKDIR/.lock). SIGTERM or Ctrl-C (SIGINT) stops it after the current epoch with a
checkpoint (exit status 0); a second one stops it at once (status 130 for SIGINT, 143 for
SIGTERM). Exit status 2: bad input (config, workdir, prompts, checkpoint, reward) or a workdir in
use; 3: training diverged (non-finite updates); 4: a checkpoint could not be written (disk full).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags, logging
from ml_collections import config_flags

from vard_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, samples and checkpoints.")


_ALLOW_CHANGES = flags.DEFINE_list(
    "allow_changes", [], "Config fields that may differ from the latest checkpoint's config when "
    "resuming, changed on purpose (e.g. train.epochs,policy.learning_rate); 'all' accepts any.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --config=... --workdir=...")
    if _CONFIG.value is None:
        cli.fail("--config is required, e.g. --config=configs/shapes.py")
    if not _WORKDIR.value:
        cli.fail("--workdir is required, e.g. --workdir=runs/demo")
    config = cli.config_or_fail(_CONFIG)
    from vard_jax.config import ConfigError, check_schema

    try:
        check_schema(config)  # before anything reads a field
    except ConfigError as error:
        cli.fail(str(error))
    from vard_jax.parallel import host

    host.configure(config)  # before the CPU backend starts
    import jax

    from vard_jax import prompts as prompts_lib
    from vard_jax.config import validate
    from vard_jax.parallel import distributed

    try:
        distributed.initialize(config)  # before anything touches a device
    except (ConfigError, distributed.DistributedError) as error:
        cli.fail(str(error))
    try:
        validate(config, jax.device_count())
        for field in ("train_prompts", "eval_prompts"):
            try:
                prompts_lib.load_prompts(config.sample[field])
            except ValueError as error:
                raise ConfigError(f"config.sample.{field}: {error}") from None
    except ConfigError as error:
        cli.fail(str(error))
    if jax.default_backend() == "cpu":
        logging.info("%d CPU device(s) (config.mesh.cpu_devices = %d)",
                     jax.local_device_count(), config.mesh.cpu_devices)

    from vard_jax.training import workdir as workdir_lib

    workdir = pathlib.Path(_WORKDIR.value)
    created = [d for d in (workdir, *workdir.parents) if not d.exists()]
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # The lock file's first write doubles as the probe of a writable workdir.
        lock = workdir_lib.WorkdirLock(workdir)
        if jax.process_index() == 0:  # a multi-process run locks once
            lock.acquire()
    except workdir_lib.WorkdirError as error:
        cli.fail(str(error))
    except OSError as error:
        cli.fail(f"workdir {workdir} is not writable ({error.strerror}); choose another --workdir")

    def stop(message: str, status: int = 2) -> None:
        """A failure after training began: the lock is released (a clean end), files kept."""
        lock.release()
        cli.fail(message, status)

    def fail(message: str, status: int = 2) -> None:
        """A start-up failure leaves no workdir behind that this run created and left empty."""
        lock.release()
        if created and not any(p.is_file() and p.name != workdir_lib.LOCK_NAME
                               for p in workdir.rglob("*")):
            (workdir / workdir_lib.LOCK_NAME).unlink(missing_ok=True)
            inner = sorted(workdir.rglob("*"), key=lambda p: -len(p.parts))
            for directory in inner + created:  # innermost first; only empty ones go
                try:
                    directory.rmdir()
                except OSError:
                    pass
        cli.fail(message, status)

    from vard_jax.rewards.registry import RewardError
    from vard_jax.training.checkpoints import CheckpointError
    from vard_jax.training.faults import NonFiniteError
    from vard_jax.training.loop import Loop

    try:
        loop = Loop(config, workdir, allow_changes=_ALLOW_CHANGES.value, command=sys.argv)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error).splitlines()[0])
    except KeyboardInterrupt:
        fail("interrupted (SIGINT) before training began; nothing was saved", status=130)
    try:
        rows = loop.run()
    except (CheckpointError, RewardError) as error:
        stop(str(error).splitlines()[0])
    except workdir_lib.SaveError as error:  # the earlier checkpoints are complete
        stop(str(error), status=4)
    except NonFiniteError as error:  # the last good checkpoint is kept; see docs/RELIABILITY.md
        stop(str(error), status=3)
    except KeyboardInterrupt:  # SIGINT before the loop took over the signal
        stop("interrupted (SIGINT) before the first epoch; nothing was saved", status=130)
    lock.release()
    if rows:
        final = rows[-1]
        keys = [k for k in final if k.startswith("eval_") and k.endswith("_mean")]
        print(json.dumps({"step": final["step"], **{k: final[k] for k in keys},
                          "wall_s": round(final["wall_s"], 1)}))


if __name__ == "__main__":
    cli.run(main)
