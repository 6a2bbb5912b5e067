"""Score a trained checkpoint (or the untouched pretrained model) on a fixed prompt set.

    python -m vard_jax.evaluate --workdir=runs/demo                    # latest checkpoint
    python -m vard_jax.evaluate --workdir=runs/demo --step=8 --num_samples=256 --seed=1
    python -m vard_jax.evaluate --workdir=runs/demo --prompts_file=my_prompts.txt
    python -m vard_jax.evaluate --workdir=runs/demo --pretrained       # the base model
    python -m vard_jax.evaluate --config=configs/shapes.py --pretrained --out=base.json

A checkpoint is evaluated with the config saved next to it. Every configured reward is scored
(``reward.name``, its parts, ``reward.eval_extra``; for the shapes world always
``shape_fidelity`` too, unless a prompts file holds captions outside the world's grammar, which
the summary then lists under ``skipped_rewards``), together with the mean squared distance
between the evaluated policy's and the pretrained model's guided noise predictions along the
policy's own trajectories.

The JSON summary goes to stdout (one line) and to ``--out`` (default
``WORKDIR/eval_step_<N>.json``, or ``WORKDIR/eval_pretrained.json`` with ``--pretrained``).
With the defaults (the config's held-out prompts, its eval batch size and seed) the numbers
reproduce the training loop's own evaluation of the same step in ``metrics.jsonl``.

``run_evaluation`` is the library function behind the command line (it raises
``EvaluationError``, one line, instead of exiting); loading a run is
``vard_jax.training.runs``. Command-line flags are defined only when the module runs as a
program.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import TYPE_CHECKING, Any, Optional

# The loop's evaluation seeds its noise with ``train.seed + EVAL_NOISE_SEED_OFFSET``: the same
# offset here makes ``--seed=train.seed`` (the default) reproduce the logged evaluation.
from vard_jax.prompts import EVAL_NOISE_SEED_OFFSET

from vard_jax.training import runs
from vard_jax.training.runs import (EvaluationError, ModelSpec, checked_selection,
                                    configure_eval_rewards, evaluation_prompts, first_line,
                                    load_policy, prepare_config, resolve_config,
                                    warn_if_truncated)

if TYPE_CHECKING:
    from absl.flags import FlagHolder

    from vard_jax.cli import ModelFlags, SteeringFlags


def _finite(value: float) -> Optional[float]:
    """``value`` as a float, or None (JSON null) when it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None


def run_evaluation(spec: ModelSpec, prompts_file: Optional[str] = None,
                   num_samples: Optional[int] = None, seed: Optional[int] = None,
                   batch_size: Optional[int] = None, steering: Any = None,
                   select: str = "auto") -> dict:
    """Loads the model of ``spec``, samples and scores the prompts; returns the JSON summary.

    ``seed`` (default ``train.seed``) selects the prompts and, offset by
    ``EVAL_NOISE_SEED_OFFSET``, the initial and per-step noise. ``steering`` (a
    ``SteeringSpec``) samples with the run's value (``vard_jax.sample``'s steering options);
    each prompt's image is then chosen among its particles by ``select``, and the summary has
    a ``steering`` entry (no eps distance).
    """
    resolved = resolve_config(spec)
    config = resolved.config
    seed = config.train.seed if seed is None else seed
    prompts, source = evaluation_prompts(config, prompts_file, num_samples, seed)
    steered = steering is not None and (steering.value_guidance != 0 or steering.particles > 1)
    particles = steering.particles if steered else 1
    if batch_size is None:
        batch_size = max(config.sample.eval_batch_size // particles, 1) * particles
    if batch_size % particles:
        raise EvaluationError(f"--batch_size={batch_size} holds whole groups of "
                              f"--particles={particles}: use a multiple of {particles}")
    if steered:
        select = checked_selection(select, steering)
    skipped = configure_eval_rewards(config, prompts)
    prepare_config(config, batch_size)
    loaded = load_policy(spec, resolved, with_value=steered)
    warn_if_truncated(prompts, loaded.trainer.pipeline, source)

    from vard_jax.training import evaluation

    extra = {}
    try:
        if steered:
            from vard_jax.training import value_sampling

            scores, extra = value_sampling.evaluate_steered(
                loaded, steering, select, prompts, batch_size // particles,
                seed + EVAL_NOISE_SEED_OFFSET)
            eps_distance = math.nan
        else:
            result = evaluation.evaluate(loaded.trainer, loaded.policy_params, prompts,
                                         batch_size, seed + EVAL_NOISE_SEED_OFFSET)
            scores, eps_distance = result.scores, result.eps_distance
    except ValueError as error:  # a reward that failed its checks, impossible steering
        raise EvaluationError(first_line(error)) from None
    rewards = {name: {"mean": _finite(values.mean()), "std": _finite(values.std()),
                      "min": _finite(values.min()), "max": _finite(values.max())}
               for name, values in scores.items()}
    summary = {
        "step": loaded.step,
        "pretrained": loaded.pretrained,
        "workdir": str(spec.workdir) if spec.workdir is not None else None,
        "reward": loaded.trainer.reward.name,
        "rewards": rewards,
        "skipped_rewards": skipped,
        "eps_distance": _finite(eps_distance),
        "num_samples": len(prompts),
        "distinct_prompts": len(set(prompts)),
        "seed": seed,
        "batch_size": batch_size,
        "devices": loaded.trainer.mesh.devices.size,
        "prompts_source": source,
    }
    if steered:
        summary["steering"] = {**steering._asdict(), "select": select, **extra}
    return summary


def default_output(spec: ModelSpec, summary: dict) -> Optional[pathlib.Path]:
    """WORKDIR/eval_step_<N>.json or WORKDIR/eval_pretrained.json (None without a workdir);
    steered evaluations add the steering, e.g. eval_step_12_guidance2_smc4.json."""
    if spec.workdir is None:
        return None
    name = "eval_pretrained" if summary["pretrained"] else f"eval_step_{summary['step']}"
    steering = summary.get("steering")
    if steering:
        if steering["value_guidance"]:
            name += f"_guidance{steering['value_guidance']:g}"
        if steering["particles"] > 1:
            kind = "smc" if steering["resample_every"] else "bestof"
            name += f"_{kind}{steering['particles']}_{steering['select']}"
    return spec.workdir / f"{name}.json"


_FLAGS: Optional[ModelFlags] = None
_STEERING: Optional[SteeringFlags] = None
_NUM_SAMPLES: Optional["FlagHolder"] = None


def main(argv: list[str]) -> None:
    """Entry point of ``python -m vard_jax.evaluate`` (flags defined in ``__main__``)."""
    from vard_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --workdir=DIR or --config=FILE "
                 "--pretrained")
    assert _FLAGS is not None and _NUM_SAMPLES is not None and _STEERING is not None, \
        "flags are defined in __main__"
    cli.quiet_logging()
    spec = cli.model_spec(_FLAGS)
    runs.configure_host_devices(spec, _FLAGS.batch_size.value)
    try:
        if _FLAGS.out.value:
            runs.check_output(pathlib.Path(_FLAGS.out.value))
        summary = run_evaluation(spec, prompts_file=_FLAGS.prompts_file.value,
                                 num_samples=_NUM_SAMPLES.value, seed=_FLAGS.seed.value,
                                 batch_size=_FLAGS.batch_size.value,
                                 steering=cli.steering_from_flags(_STEERING),
                                 select=_STEERING.select.value)
        out = pathlib.Path(_FLAGS.out.value) if _FLAGS.out.value else default_output(spec,
                                                                                     summary)
        if out is not None:
            summary["out"] = str(out)
            runs.write_json(out, summary)
    except EvaluationError as error:
        cli.fail(str(error))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    from absl import flags as _absl_flags

    from vard_jax import cli as _cli

    _FLAGS = _cli.define_model_flags("Where to write the JSON summary (default: "
                                "WORKDIR/eval_step_<N>.json or WORKDIR/eval_pretrained.json).")
    _NUM_SAMPLES = _absl_flags.DEFINE_integer(
        "num_samples", None, "Images to sample and score (default: eval_batch_size * "
        "eval_batches of the config; with --prompts_file, one per line).")
    _STEERING = _cli.define_steering_flags()
    _absl_flags.adopt_module_key_flags(_cli)
    _cli.run(main)
