"""Shared start-up of the entry points: one-line errors with exit status 2, JAX settings, and
the flags that choose a model (a run, a step, the pretrained model) and its steering."""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, NoReturn, Optional

from absl import flags
from absl.flags import FlagHolder

if TYPE_CHECKING:
    from vard_jax.training.runs import ModelSpec


def fail(message: str, status: int = 2) -> NoReturn:
    """Prints one line to stderr and ends the process with ``status``, at once.

    The entry points call it only once their files are closed or complete (an unfinished
    checkpoint save is never read as good). Ending with ``os._exit`` skips the interpreter's
    shutdown, where background threads of orbax and asyncio could otherwise print tracebacks
    (``Event loop is closed``) after this line.
    """
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def config_files(argv: list[str]) -> list[str]:
    """The paths given to ``--config`` (``--config=PATH[:ARG]`` or ``--config PATH[:ARG]``)."""
    paths = []
    for index, argument in enumerate(argv):
        if argument.startswith("--config="):
            paths.append(argument.split("=", 1)[1])
        elif argument == "--config" and index + 1 < len(argv):
            paths.append(argv[index + 1])
    return [path.split(":", 1)[0] for path in paths]


def make_config_packages_importable(argv: list[str]) -> None:
    """A config file in a package directory (one with ``__init__.py``, as the repository's
    ``configs/``) may import its siblings (``from configs import shapes``) from wherever the
    command runs: the directory above that package is appended to ``sys.path`` (after
    everything installed)."""
    for path in config_files(argv):
        package = pathlib.Path(path).expanduser().resolve().parent
        if (package / "__init__.py").is_file() and str(package.parent) not in sys.path:
            sys.path.append(str(package.parent))


def parse_flags_or_fail(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (unknown flag, bad override, bad config file) are one line."""
    make_config_packages_importable(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - user input: reported as one line
        fail(_flag_error(error, argv))


def _flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for an error of flag parsing, naming the flag or the config file at fault."""
    context = error.__context__
    if isinstance(error, AttributeError) and isinstance(context, KeyError):
        # ml_collections: an override of a key the config does not have
        text = _one_line(error)
        match = re.search(r"'([^'\\]+)", text)
        key = match.group(1) if match else text
        overrides = [a.split("=", 1)[0].lstrip("-") for a in argv
                     if a.startswith("--config.") and a.split("=", 1)[0].endswith(f".{key}")]
        name = overrides[0] if overrides else key
        hint = re.search(r"Did you mean \S+", text)
        hint = f" ({hint.group(0).replace(chr(34), chr(39))}?)" if hint else ""
        return (f"unknown config key {name!r}{hint}: the config has no such field (every "
                "field, with its meaning, is in vard_jax/schema.py)")
    files = config_files(argv)
    if files and not isinstance(error, flags.Error):
        path = os.path.abspath(files[-1])
        traceback = error.__traceback__
        while traceback is not None:  # raised inside the config file's own code
            if os.path.abspath(traceback.tb_frame.f_code.co_filename) == path:
                return (f"--config={files[-1]}: get_config() raised {type(error).__name__}: "
                        f"{_one_line(error)}")
            traceback = traceback.tb_next
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    """The useful part of an error message as one line (escaped newlines included)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Attempted")]
    if not lines:
        return type(error).__name__
    if isinstance(error, KeyError) or "Did you mean" in text:  # override of a key not in config
        key = lines[0].strip("'\"")
        return f"unknown config key {key!r}" + (f"; {' '.join(lines[1:])}" if lines[1:] else "")
    errno_lines = [line for line in lines if line.startswith("[Errno")]
    if errno_lines:  # config_flags: a config file that cannot be read
        return errno_lines[-1]
    if any(line.startswith("Traceback") for line in lines):  # an error inside get_config()
        return f"{lines[0].split(':')[0]}: {lines[-1]}"
    return " ".join(lines)


def config_or_fail(holder):
    """The config of a ``config_flags`` holder; a file that failed to load gives one line."""
    try:
        config = holder.value
        config.keys()  # config_flags defers load errors to the first access
        return config
    except Exception as error:  # noqa: BLE001 - user input: reported as one line
        fail(f"cannot load --config: {_one_line(error)}")


class _NoLibraryTracebacks:
    """A logging filter: orbax logs the failure of a background save or restore with its
    traceback (hundreds of lines) before the call that failed raises; the entry points report
    that failure as one line, so the library's copy is dropped."""

    def filter(self, record) -> bool:
        return not (record.exc_info and "/orbax/" in record.pathname.replace(os.sep, "/"))


def _is_closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_reports() -> None:
    """After a failed save or restore, orbax closes its asyncio loop while tensorstore's
    threads still call back into it; each callback prints ``RuntimeError: Event loop is closed``
    with a traceback. Those reports, and only those, are dropped: the failure itself is
    reported as one line by the entry point."""
    import threading

    excepthook, unraisablehook, thread_hook = (sys.excepthook, sys.unraisablehook,
                                               threading.excepthook)
    sys.excepthook = lambda kind, value, tb: (
        None if _is_closed_loop(value) else excepthook(kind, value, tb))
    sys.unraisablehook = lambda report: (
        None if _is_closed_loop(report.exc_value) else unraisablehook(report))
    threading.excepthook = lambda args: (
        None if _is_closed_loop(args.exc_value) else thread_hook(args))


def flags_parser(argv: list[str]) -> list[str]:
    rest = parse_flags_or_fail(argv)
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # orbax and jax log every save at INFO
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_NoLibraryTracebacks())
    _drop_closed_loop_reports()
    return rest


def run(main: Callable[[list[str]], None]) -> None:
    from absl import app

    app.run(main, flags_parser=flags_parser)


# --- the flags that choose a model (vard_jax.evaluate, vard_jax.sample) ----------------------
class ModelFlags(NamedTuple):
    """The flags that choose a model, shared by ``vard_jax.evaluate`` and ``vard_jax.sample``."""

    workdir: "FlagHolder"
    step: "FlagHolder"
    config: "FlagHolder"
    pretrained: "FlagHolder"
    prompts_file: "FlagHolder"
    seed: "FlagHolder"
    batch_size: "FlagHolder"
    out: "FlagHolder"


def define_model_flags(out_help: str) -> ModelFlags:
    """Defines the shared flags (call once, from the program's ``__main__`` block)."""
    from ml_collections import config_flags

    return ModelFlags(
        workdir=flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints "
                                    "and saved config are used)."),
        step=flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest)."),
        config=config_flags.DEFINE_config_file(
            "config", None, "Experiment config file (configs/*.py), for --pretrained without a "
            "workdir.", lock_config=True),
        pretrained=flags.DEFINE_bool("pretrained", False, "Use the untouched pretrained model "
                                     "instead of the checkpoint's policy."),
        prompts_file=flags.DEFINE_string("prompts_file", None, "UTF-8 text file, one prompt a "
                                         "line."),
        seed=flags.DEFINE_integer("seed", None, "Seed of the sampling noise and of the "
                                  "evaluated prompts' selection (default: the config's "
                                  "train.seed)."),
        batch_size=flags.DEFINE_integer("batch_size", None, "Images per sampling batch "
                                        "(default: the config's sample.eval_batch_size)."),
        out=flags.DEFINE_string("out", None, out_help),
    )


def model_spec(model_flags: ModelFlags) -> "ModelSpec":
    """The ModelSpec named by the parsed flags."""
    from vard_jax.training.runs import ModelSpec

    workdir = model_flags.workdir.value
    return ModelSpec(workdir=pathlib.Path(workdir) if workdir else None,
                     step=model_flags.step.value, config=model_flags.config.value,
                     pretrained=model_flags.pretrained.value)


def quiet_logging() -> None:
    """Keeps stderr to warnings (orbax logs every restore at INFO) unless --verbosity is given."""
    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


class SteeringFlags(NamedTuple):
    value_guidance: "FlagHolder"
    particles: "FlagHolder"
    temperature: "FlagHolder"
    resample_every: "FlagHolder"
    ess_threshold: "FlagHolder"
    select: "FlagHolder"


def define_steering_flags() -> SteeringFlags:
    """The flags of sampling with a run's value (``vard_jax.diffusion.steering``)."""
    return SteeringFlags(
        value_guidance=flags.DEFINE_float(
            "value_guidance", 0.0, "Value guidance strength lambda: eps - lambda sqrt(1 - a_t) "
            "grad V (0: off)."),
        particles=flags.DEFINE_integer(
            "particles", 1, "Particles per image; > 1 runs value-steered SMC (or best-of-N "
            "with --resample_every=0)."),
        temperature=flags.DEFINE_float("temperature", 1.0, "SMC temperature of exp(V / T)."),
        resample_every=flags.DEFINE_integer("resample_every", 1, "Steps between SMC "
                                            "resampling points (0: never: best-of-N)."),
        ess_threshold=flags.DEFINE_float("ess_threshold", 1.0, "Resample when the effective "
                                         "sample size is below this fraction of --particles."),
        select=flags.DEFINE_string("select", "auto", "Which particle an image is: weight "
                                   "(drawn by SMC weight), value (highest V), reward (highest "
                                   "reward); auto = weight with resampling, else value."),
    )


def steering_from_flags(steering_flags: Optional[SteeringFlags]) -> Any:
    """The SteeringSpec of the parsed flags."""
    from vard_jax.diffusion.sampler import SteeringSpec

    assert steering_flags is not None
    return SteeringSpec(value_guidance=steering_flags.value_guidance.value,
                        particles=steering_flags.particles.value,
                        temperature=steering_flags.temperature.value,
                        resample_every=steering_flags.resample_every.value,
                        ess_threshold=steering_flags.ess_threshold.value)
