"""A saved training run, loaded for sampling and evaluation: its config, checkpoint, policy
and value, the host's devices for it, and the prompts to score.

The functions take plain arguments and raise ``EvaluationError`` (a one-line message for the
user) instead of exiting; ``vard_jax.evaluate``, ``vard_jax.sample`` and ``vard_jax.export``
are command lines over them. Heavy imports (JAX, Flax, orbax) happen inside the functions, so
that a command line checks its arguments first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import ml_collections

if TYPE_CHECKING:
    from vard_jax.training.checkpoints import Checkpointer
    from vard_jax.training.trainer import Trainer

# Reward that the shapes world can always score (it checks the rendered scene against the prompt).
SHAPES_FIDELITY_REWARD = "shape_fidelity"
# Checkpoints are only read here; max_to_keep matters to saving alone, so it is never reached.
_KEEP_ALL = 1_000_000


class EvaluationError(ValueError):
    """A problem with the arguments or the run directory; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load: a run's checkpoint, or the pretrained model of a run or a config.

    Exactly one of ``workdir`` and ``config`` is needed; both are allowed with ``pretrained``
    (the given config then replaces the run's). ``step`` selects a checkpoint (default: latest).
    """

    workdir: Optional[pathlib.Path] = None
    step: Optional[int] = None
    config: Optional[ml_collections.ConfigDict] = None
    pretrained: bool = False


@dataclasses.dataclass
class LoadedPolicy:
    """A built trainer and the UNet parameters to sample with."""

    config: ml_collections.ConfigDict
    trainer: "Trainer"
    policy_params: Any
    step: int  # the checkpoint's epoch; 0 for the pretrained model
    pretrained: bool
    # The run's value and reward statistics (``load_policy(..., with_value=True)``), also with
    # the pretrained policy (sampling-time steering of the base model); None otherwise.
    value_params: Any = None
    reward_stats: Any = None


class ResolvedConfig(NamedTuple):
    """The config a model is built from, and where it came from."""

    config: ml_collections.ConfigDict
    step: Optional[int]  # the checkpoint the config came from (None: from a config file)


# --- run directories and configs ---------------------------------------------------------------
def checkpoint_dir(workdir: pathlib.Path) -> pathlib.Path:
    """Where ``vard_jax.main`` writes the checkpoints of a run."""
    return workdir / "checkpoints"


def open_checkpointer(workdir: pathlib.Path) -> "Checkpointer":
    """The run's checkpointer; raises EvaluationError when the run has no checkpoint at all.

    The directory is checked before orbax opens it, because opening creates it.
    """
    if not workdir.is_dir():
        raise EvaluationError(f"workdir {workdir} does not exist")
    directory = checkpoint_dir(workdir)
    if not directory.is_dir() or not any(p.is_dir() and p.name.isdigit()
                                         for p in directory.iterdir()):
        raise EvaluationError(f"no checkpoint under {directory}; train first with "
                              "python -m vard_jax.main, or evaluate the base model with "
                              "--config=... --pretrained")
    from vard_jax.training.checkpoints import Checkpointer

    return Checkpointer(directory, _KEEP_ALL)


def _checked_step(checkpointer: "Checkpointer", step: Optional[int]) -> int:
    steps = sorted(int(s) for s in checkpointer.manager.all_steps())
    if not steps:
        raise EvaluationError(f"no complete checkpoint under {checkpointer.directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise EvaluationError(f"--step={step}: no checkpoint of that step under "
                              f"{checkpointer.directory}; saved steps: "
                              f"{', '.join(map(str, steps))}")
    return step


def resolve_config(spec: ModelSpec) -> ResolvedConfig:
    """The config to build the model from, and the checkpoint step it belongs to."""
    if spec.config is None and spec.workdir is None:
        raise EvaluationError("give --workdir=DIR (a training run), or --config=FILE with "
                              "--pretrained")
    if spec.config is not None and not spec.pretrained:
        raise EvaluationError("--config is used with --pretrained only; a checkpoint is "
                              "evaluated with the config saved in it (--workdir)")
    if spec.step is not None and spec.workdir is None:
        raise EvaluationError("--step selects a checkpoint and needs --workdir")
    if spec.config is not None:
        return ResolvedConfig(spec.config, None)
    checkpointer = open_checkpointer(spec.workdir)
    try:
        step = _checked_step(checkpointer, spec.step)
        try:
            saved = checkpointer.restore_config(step)
        except (OSError, ValueError, KeyError) as error:
            raise EvaluationError(f"cannot read the config of checkpoint {step} under "
                                  f"{checkpointer.directory}: {first_line(error)}") from None
    finally:
        checkpointer.close()
    from vard_jax.config import with_defaults

    return ResolvedConfig(with_defaults(saved), step)


def _shapes_grammar_problem(prompts: Sequence[str]) -> Optional[str]:
    """None when every prompt is a shapes-world caption, else a short description."""
    from vard_jax.worlds import shapes as world

    outside = []
    for prompt in dict.fromkeys(prompts):
        try:
            world.parse_caption(prompt)
        except ValueError:
            outside.append(prompt)
    if not outside:
        return None
    return (f"{len(outside)} of {len(set(prompts))} distinct prompts are outside the "
            f"shapes-world grammar, e.g. {outside[0]!r}")


def configure_eval_rewards(config: ml_collections.ConfigDict,
                           prompts: Sequence[str]) -> dict[str, str]:
    """Makes ``shape_fidelity`` an evaluation reward of the shapes world (edits ``config``).

    Shape fidelity scores a sample against the scene its caption describes, so it is added to
    ``reward.eval_extra`` when every prompt is in the world's caption grammar, and taken out of
    it when some prompt is not (free-form prompts files). Returns the rewards left out, with
    the reason. Other model families, and a main reward that is (or contains) shape fidelity,
    are left as configured.
    """
    if config.pretrained.family not in ("shapes", "shapes_flow"):
        return {}
    names = {part.partition(":")[0].strip() for part in config.reward.name.split(",")}
    extra = [n.strip() for n in config.reward.eval_extra.split(",") if n.strip()]
    if SHAPES_FIDELITY_REWARD in names:
        return {}
    problem = _shapes_grammar_problem(prompts)
    if problem is None:
        if SHAPES_FIDELITY_REWARD not in extra:
            extra.append(SHAPES_FIDELITY_REWARD)
        skipped = {}
    else:  # the rewards that read the caption's scene
        skipped = {n: problem for n in (SHAPES_FIDELITY_REWARD, "caption_choice")
                   if n in extra or n == SHAPES_FIDELITY_REWARD}
        extra = [n for n in extra if n not in skipped]
    config.reward.eval_extra = ",".join(extra)
    return skipped


def data_axis_size(config: ml_collections.ConfigDict) -> int:
    """Devices along the data axis of ``config``'s mesh on this machine."""
    import jax

    from vard_jax.config import ConfigError, mesh_shape

    try:
        return mesh_shape(config, jax.device_count())[0]
    except ConfigError as error:
        raise EvaluationError(str(error)) from None


def check_batch_size(batch_size: int, data_axis: int, flag: str = "--batch_size") -> None:
    """Raises EvaluationError unless the batch splits evenly over the data axis."""
    if batch_size < 1:
        raise EvaluationError(f"{flag}={batch_size}: must be >= 1")
    if batch_size % data_axis:
        raise EvaluationError(f"{flag}={batch_size}: must be divisible by the {data_axis} "
                              "devices of the data axis")


def prepare_config(config: ml_collections.ConfigDict, batch_size: int) -> int:
    """Validates ``config`` on this machine for evaluation batches of ``batch_size``.

    Sets ``sample.eval_batch_size`` to the batch size (the field that evaluation uses); returns
    the data-axis size.
    """
    import jax

    from vard_jax.config import ConfigError, validate

    data_axis = data_axis_size(config)
    check_batch_size(batch_size, data_axis)
    config.sample.eval_batch_size = batch_size
    try:
        validate(config, jax.device_count())
    except ConfigError as error:
        raise EvaluationError(str(error)) from None
    return data_axis


def load_policy(spec: ModelSpec, resolved: ResolvedConfig,
                with_value: bool = False) -> LoadedPolicy:
    """Builds the trainer of ``resolved.config`` and restores (or takes) the policy params;
    ``with_value`` also restores the run's value (which needs ``spec.workdir``, with or
    without ``spec.pretrained``)."""
    from vard_jax.training.checkpoints import abstract_with_shardings
    from vard_jax.training.trainer import Trainer

    if with_value and spec.workdir is None:
        raise EvaluationError("sampling with a value needs the run that trained it: give "
                              "--workdir=RUN (add --pretrained to steer the base model)")
    config = resolved.config
    try:
        trainer = Trainer(config)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationError(first_line(error)) from None
    if spec.pretrained and not with_value:
        return LoadedPolicy(config, trainer, trainer.pretrained_policy_params(), 0, True)
    checkpointer = open_checkpointer(spec.workdir)
    abstract = abstract_with_shardings(trainer.abstract_state,
                                       trainer.state_shardings(trainer.abstract_state))
    try:
        state, step = checkpointer.restore(abstract, resolved.step)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvaluationError(f"cannot restore checkpoint {resolved.step} under "
                              f"{checkpointer.directory}: {first_line(error)}") from None
    finally:
        checkpointer.close()
    value = (state.value_params, state.reward_stats) if with_value else (None, None)
    if spec.pretrained:
        return LoadedPolicy(config, trainer, trainer.pretrained_policy_params(), 0, True, *value)
    return LoadedPolicy(config, trainer, state.policy_params, int(step), False, *value)


# --- prompts -------------------------------------------------------------------------------------
def read_prompts_file(path: str | pathlib.Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file; raises EvaluationError naming the problem."""
    from vard_jax import prompts as prompts_lib

    path = pathlib.Path(path)
    if path.is_dir():
        raise EvaluationError(f"prompts file {path} is a directory; give a text file with one "
                              "prompt per line")
    if not path.is_file():
        raise EvaluationError(f"prompts file {path} does not exist")
    try:
        # An absolute path is never mistaken for a split name ("train", "heldout").
        return prompts_lib.load_prompts(str(path.resolve()))
    except ValueError as error:
        raise EvaluationError(first_line(error)) from None
    except OSError as error:
        raise EvaluationError(f"cannot read prompts file {path}: {error.strerror}") from None


def warn_if_truncated(prompts: Sequence[str], pipeline, source: str) -> None:
    """One warning when prompts are longer than the tokenizer's length (the model sees them
    truncated), as training gives."""
    from vard_jax import prompts as prompts_lib

    prompts_lib.warn_if_truncated(sorted(set(prompts)), pipeline, source)


def check_output(path: pathlib.Path, flag: str = "--out") -> None:
    """Raises EvaluationError when ``path`` cannot be written as a file (before any work)."""
    if path.is_dir():
        raise EvaluationError(f"{flag}={path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise EvaluationError(f"{flag}={path}: cannot write under {parent}; choose another path")


def cycle(prompts: Sequence[str], count: int) -> list[str]:
    """``prompts`` in order, repeated or truncated to ``count`` entries."""
    return [prompts[i % len(prompts)] for i in range(count)]


def evaluation_prompts(config: ml_collections.ConfigDict, prompts_file: Optional[str],
                       num_samples: Optional[int], seed: int) -> tuple[list[str], str]:
    """(prompts to score, their source).

    Default: the config's ``sample.eval_prompts`` set, a seeded fixed selection of
    ``num_samples`` (default ``eval_batch_size * eval_batches``, as in training). With
    ``prompts_file``: its prompts in file order, cycled to ``num_samples`` (default: all).
    """
    from vard_jax import prompts as prompts_lib

    if num_samples is not None and num_samples < 1:
        raise EvaluationError(f"--num_samples={num_samples}: must be >= 1")
    if prompts_file:
        prompts = read_prompts_file(prompts_file)
        source = str(pathlib.Path(prompts_file).resolve())
        return cycle(prompts, num_samples or len(prompts)), source
    source = config.sample.eval_prompts
    try:
        prompt_set = prompts_lib.load_prompts(source)
    except ValueError as error:
        raise EvaluationError(f"config.sample.eval_prompts: {first_line(error)}") from None
    default_count = config.sample.eval_batch_size * config.sample.eval_batches
    return prompts_lib.fixed(prompt_set, num_samples or default_count, seed), source


def peek_saved_config(workdir: pathlib.Path, step: Optional[int] = None) -> Optional[dict]:
    """The config JSON of a run's checkpoint (``step``, default the latest), read as a plain
    file; None when it cannot be read. Only for choosing the host's device count: orbax, which
    ``resolve_config`` reads it with, starts the JAX backend when it opens the directory, and
    the device count is fixed from then on."""
    directory = checkpoint_dir(workdir)
    try:
        steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        chosen = step if step is not None else steps[-1]
        return json.loads((directory / str(chosen) / "config" / "metadata").read_text())
    except (OSError, ValueError, IndexError):
        return None


def planned_host_devices(spec: ModelSpec, batch_size: Optional[int] = None,
                         environ=None, cores: Optional[int] = None) -> Optional[int]:
    """The CPU devices the model's config asks for (``mesh.cpu_devices``; 0: every core that
    divides the batches), as training chooses them (``vard_jax.parallel.host``).
    ``batch_size`` (the evaluation's, when given) must divide too. None when the process keeps
    its devices (the config could not be read, the user named a count, or one device)."""
    if spec.config is not None:
        config = spec.config.copy_and_resolve_references()
    elif spec.workdir is not None:
        saved = peek_saved_config(spec.workdir, spec.step)
        if saved is None:
            return None
        from vard_jax.config import with_defaults

        config = with_defaults(saved)
    else:
        return None
    if batch_size is not None:
        config.sample.eval_batch_size = batch_size
    from vard_jax.parallel import host

    try:
        return host.planned_count(config, environ, cores)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # a config that validate() will name later keeps one device


def configure_host_devices(spec: ModelSpec, batch_size: Optional[int] = None) -> Optional[int]:
    """Splits a CPU host as ``planned_host_devices`` says, before anything starts the backend;
    returns the count set, or None."""
    from vard_jax.parallel import host

    return host.set_device_count(planned_host_devices(spec, batch_size))


def checked_selection(select: str, steering: Any) -> str:
    """``value_sampling.resolve_selection``, its error as an EvaluationError."""
    from vard_jax.training import value_sampling

    try:
        return value_sampling.resolve_selection(select, steering)
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def write_json(path: pathlib.Path, data: dict) -> None:
    """Writes ``data`` atomically (a fresh temporary file, then rename; never through a planted
    link); raises EvaluationError."""
    from vard_jax.training.workdir import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=2) + "\n")
    except OSError as error:
        raise EvaluationError(f"cannot write {path}: {error.strerror}") from None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip().strip("'\"")
    return text.splitlines()[0] if text else type(error).__name__
