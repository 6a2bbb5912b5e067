"""Sample images for given prompts and save them as a PNG grid with their rewards.

    python -m vard_jax.sample --workdir=runs/demo --prompt="a red circle" --out=grid.png
    python -m vard_jax.sample --workdir=runs/demo --step=8 --prompts_file=prompts.txt \\
        --num_per_prompt=4 --seed=1 --out=grid.png
    python -m vard_jax.sample --config=configs/shapes.py --pretrained --prompt="..." --out=base.png

With a run's value (VARD's, or one trained alone on the base model with
``--config.algorithm=value``), sampling can be steered by it, for the run's policy or with
``--pretrained`` for the base model (docs/STEERING.md):

    python -m vard_jax.sample --workdir=runs/demo --value_guidance=2 --prompt="..." --out=g.png
    python -m vard_jax.sample --workdir=runs/value --pretrained --particles=4 --prompt="..." \
        --out=smc.png                          # value-steered SMC, 4 particles a prompt
    python -m vard_jax.sample --workdir=runs/demo --particles=4 --resample_every=0 \
        --select=reward --prompt="..." --out=best.png      # best-of-4 by the reward

The model is chosen as in ``vard_jax.evaluate``: the latest (or ``--step``) checkpoint of a
training run, or with ``--pretrained`` the untouched base model of the run's or the given
config. Each prompt gets ``--num_per_prompt`` samples (one row of the grid each when more than
one); the configured reward is written under every image. A JSON line with the grid's path and
the per-image rewards goes to stdout.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from vard_jax.training import runs
from vard_jax.training.runs import EvaluationError, ModelSpec

if TYPE_CHECKING:
    from absl.flags import FlagHolder

    from vard_jax.cli import ModelFlags, SteeringFlags

    from vard_jax.training.trainer import Trainer


def sample_images(trainer: "Trainer", policy_params: Any, prompts: Sequence[str],
                  batch_size: int, seed: int) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1], one per prompt, sampled in batches of ``batch_size`` with
    the evaluation's sampler (``sample.eval_eta``: the ODE for the flow configs).

    The noise of batch ``i`` comes from ``fold_in(PRNGKey(seed), i)``; the last batch is padded
    with its first prompt and the padding discarded.
    """
    from vard_jax.training import evaluation

    return evaluation.evaluate(trainer, policy_params, list(prompts), batch_size, seed,
                               scored=False, distance=False).images


def score_label(reward_name: str) -> str:
    """The reward's name for the captions; "r" for weighted sums, whose names are long."""
    return "r" if ("," in reward_name or ":" in reward_name) else reward_name


def collect_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) or ``--prompts_file``: exactly one is needed."""
    if prompts and prompts_file:
        raise EvaluationError("give either --prompt (repeatable) or --prompts_file, not both")
    if prompts_file:
        return runs.read_prompts_file(prompts_file)
    cleaned = [p.strip() for p in prompts]
    if not cleaned:
        raise EvaluationError('no prompts; give --prompt="..." (repeatable) or --prompts_file=F')
    if not all(cleaned):
        raise EvaluationError("--prompt is empty; give the text of a prompt")
    return cleaned


def run_sampling(spec: ModelSpec, prompts: Sequence[str], out: str | pathlib.Path,
                 num_per_prompt: int = 1, seed: Optional[int] = None,
                 batch_size: Optional[int] = None, steering: Any = None,
                 select: str = "auto") -> dict:
    """Samples ``num_per_prompt`` images per prompt, scores them, writes the grid to ``out``.

    ``steering`` (a ``SteeringSpec``) steers sampling with the run's value: each image is then
    chosen (``select``) among ``steering.particles`` particles of its prompt.
    Returns the summary: the grid's path, the model (step, pretrained), the reward and one
    ``{"prompt", "reward"}`` entry per image in grid order (prompt-major; with steering also
    the image's final value).
    """
    if num_per_prompt < 1:
        raise EvaluationError(f"--num_per_prompt={num_per_prompt}: must be >= 1")
    steered = steering is not None and (steering.value_guidance != 0 or steering.particles > 1)
    out = pathlib.Path(out)
    if out.suffix.lower() != ".png":
        raise EvaluationError(f"--out={out}: the grid is written as PNG; name it *.png")
    runs.check_output(out)
    resolved = runs.resolve_config(spec)
    config = resolved.config
    seed = config.train.seed if seed is None else seed
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    data_axis = runs.data_axis_size(config)
    particles = steering.particles if steered else 1
    if batch_size is None:  # no larger than needed, rounded up to the data axis
        needed = -(-len(expanded) * particles // data_axis) * data_axis
        batch_size = min(max(config.sample.eval_batch_size, particles), needed)
    if batch_size % particles:
        raise EvaluationError(f"--batch_size={batch_size} holds whole groups of "
                              f"--particles={particles}: use a multiple of {particles}")
    runs.prepare_config(config, batch_size)
    if steered:
        select = runs.checked_selection(select, steering)
    loaded = runs.load_policy(spec, resolved, with_value=steered)
    trainer = loaded.trainer
    runs.warn_if_truncated(prompts, trainer.pipeline, "--prompt/--prompts_file")

    from vard_jax.training.images import save_grid

    values = None
    if steered:
        images, values = _steered_images(loaded, expanded, steering, select, batch_size, seed)
    else:
        images = sample_images(trainer, loaded.policy_params, expanded, batch_size, seed)
    try:
        rewards, _ = trainer.reward_evaluator(images, expanded)
    except ValueError as error:  # a reward that failed its checks
        raise EvaluationError(str(error).splitlines()[0]) from None
    columns = num_per_prompt if num_per_prompt > 1 else config.logging.grid_columns
    try:
        save_grid(out, images, expanded, rewards, columns=columns,
                  score_name=score_label(trainer.reward.name))
    except OSError as error:
        raise EvaluationError(f"cannot write {out}: {error.strerror}") from None
    entries = [{"prompt": p, "reward": float(r)} for p, r in zip(expanded, rewards)]
    summary = {
        "path": str(out),
        "step": loaded.step,
        "pretrained": loaded.pretrained,
        "workdir": str(spec.workdir) if spec.workdir is not None else None,
        "reward": trainer.reward.name,
        "seed": seed,
        "num_per_prompt": num_per_prompt,
        "images": entries,
    }
    if steered:
        for entry, value in zip(entries, values):
            entry["value"] = float(value)
        summary["steering"] = {**steering._asdict(), "select": select}
    return summary


def _steered_images(loaded, prompts: list[str], steering: Any, select: str, batch_size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One image per prompt, chosen among its particles, and its final value."""
    import jax

    from vard_jax.training import value_sampling

    trainer, n = loaded.trainer, steering.particles
    try:
        sampler = value_sampling.ValueSampler(trainer, steering)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    batch = value_sampling.sample_all(sampler, loaded.policy_params, loaded.value_params,
                                      loaded.reward_stats, prompts, batch_size // n, seed)
    rewards = None
    if select == "reward":
        try:
            rewards, _ = trainer.reward_evaluator(batch.images, batch.prompts)
        except ValueError as error:
            raise EvaluationError(str(error).splitlines()[0]) from None
    rows = value_sampling.select(batch, n, select, rewards,
                                 jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    return batch.images[rows], batch.final_value[rows]


# --- command line --------------------------------------------------------------------------------
_STEERING: Optional[SteeringFlags] = None
_FLAGS: Optional[ModelFlags] = None
_PROMPT: Optional["FlagHolder"] = None
_NUM_PER_PROMPT: Optional["FlagHolder"] = None


def main(argv: list[str]) -> None:
    """Entry point of ``python -m vard_jax.sample`` (flags defined in ``__main__``)."""
    from vard_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; quote prompts: --prompt=\"a red circle\"")
    assert _FLAGS is not None and _PROMPT is not None and _NUM_PER_PROMPT is not None
    cli.quiet_logging()
    if not _FLAGS.out.value:
        cli.fail("--out is required, e.g. --out=grid.png")
    try:
        prompts = collect_prompts(_PROMPT.value or [], _FLAGS.prompts_file.value)
        spec = cli.model_spec(_FLAGS)
        runs.configure_host_devices(spec, _FLAGS.batch_size.value)
        summary = run_sampling(spec, prompts, _FLAGS.out.value,
                               num_per_prompt=_NUM_PER_PROMPT.value, seed=_FLAGS.seed.value,
                               batch_size=_FLAGS.batch_size.value,
                               steering=cli.steering_from_flags(_STEERING),
                               select=_STEERING.select.value)
    except EvaluationError as error:
        cli.fail(str(error))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    from absl import flags as _absl_flags

    from vard_jax import cli as _cli

    _FLAGS = _cli.define_model_flags("Path of the PNG grid to write (required).")
    _PROMPT = _absl_flags.DEFINE_multi_string("prompt", None, "A prompt to sample (repeatable).")
    _NUM_PER_PROMPT = _absl_flags.DEFINE_integer("num_per_prompt", 1, "Samples per prompt.")
    _STEERING = _cli.define_steering_flags()
    _absl_flags.adopt_module_key_flags(_cli)
    _cli.run(main)
