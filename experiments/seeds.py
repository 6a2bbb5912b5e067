"""Runs a config over several seeds and reports base vs. fine-tuned evaluation figures.

    python experiments/seeds.py --config=configs/shapes.py --seeds=0,1,2 --out=runs/seeds_shapes

Each seed is a full run of ``vard_jax.main``'s loop in ``OUT/seed_<s>``; the base model's
figures are the step-0 evaluation of the same run (same prompts and noise as the final one).
Prints one JSON object (mean and std over seeds of every eval metric, base and tuned, and the
wall time per run) and writes it to ``OUT/summary.json``.

With ``--eval_seeds=100,101`` each run's final checkpoint (restored as ``vard_jax.evaluate``
restores it) and the base model are scored again on ``--eval_samples`` held-out and training
prompts per evaluation seed, with noise and prompt selections other than the run's:
``rescored`` in the summary gives per run the gain of every reward (tuned minus base, averaged
over the evaluation seeds), and over runs the mean, std and standard error of those gains.

    python experiments/seeds.py --config=configs/shapes.py --out=runs/demo_seeds \
        --eval_seeds=100,101 --eval_samples=96
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vard_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_OUT = flags.DEFINE_string("out", None, "Output directory (one workdir per seed).")
_EVAL_SEEDS = flags.DEFINE_string("eval_seeds", "", "Comma-separated evaluation seeds for "
                                  "rescoring each final checkpoint and the base model.")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 96, "Images per split and evaluation seed.")


def rescore(workdir: pathlib.Path, eval_seeds: list[int], samples: int) -> dict:
    """The final checkpoint of ``workdir`` and the base model, scored on held-out and training
    prompts at ``eval_seeds``: {split: {reward: {"base", "tuned", "gain"}}} (means over the
    evaluation seeds of the per-image means)."""
    from vard_jax.prompts import EVAL_NOISE_SEED_OFFSET
    from vard_jax.training import evaluation, runs

    spec = runs.ModelSpec(workdir=workdir)
    loaded = runs.load_policy(spec, runs.resolve_config(spec))
    trainer, config = loaded.trainer, loaded.config
    models = {"base": trainer.pretrained_policy_params(), "tuned": loaded.policy_params}
    out = {}
    for split in ("heldout", "train"):
        split_config = config.copy_and_resolve_references()
        split_config.sample.eval_prompts = split
        scores: dict = {}
        for seed in eval_seeds:
            prompts, _ = runs.evaluation_prompts(split_config, None, samples, seed)
            for model, params in models.items():
                result = evaluation.evaluate(trainer, params, prompts,
                                             config.sample.eval_batch_size,
                                             seed + EVAL_NOISE_SEED_OFFSET)
                for name, values in result.scores.items():
                    scores.setdefault(name, {}).setdefault(model, []).append(float(values.mean()))
        out[split] = {name: {"base": float(np.mean(v["base"])), "tuned": float(np.mean(v["tuned"])),
                             "gain": float(np.mean(v["tuned"]) - np.mean(v["base"]))}
                      for name, v in scores.items()}
    return out


def main(argv):
    del argv
    from vard_jax.parallel import host

    host.configure(cli.config_or_fail(_CONFIG))  # the CPU devices training uses (as main)
    import jax

    from vard_jax.config import ConfigError, validate
    from vard_jax.training.loop import Loop

    config = cli.config_or_fail(_CONFIG)
    if not _OUT.value:
        cli.fail("--out is required")
    out = pathlib.Path(_OUT.value)
    seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
    per_seed = {}
    eval_seeds = [int(s) for s in _EVAL_SEEDS.value.split(",") if s.strip()]
    for seed in seeds:
        run_config = config.copy_and_resolve_references()
        run_config.train.seed = seed
        try:
            validate(run_config, jax.device_count())
        except ConfigError as error:
            cli.fail(str(error))
        started = time.time()
        loop = Loop(run_config, out / f"seed_{seed}")
        loop.run()
        rows = [json.loads(line) for line in (out / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()]
        base, final = rows[0], rows[-1]
        per_seed[seed] = {
            "base": {k: v for k, v in base.items() if k.startswith("eval")},
            "tuned": {k: v for k, v in final.items() if k.startswith("eval")},
            "reward_queries": final["reward_queries"],
            "run_seconds": round(time.time() - started, 1),
        }
        if eval_seeds:
            per_seed[seed]["rescored"] = rescore(out / f"seed_{seed}", eval_seeds,
                                                 _EVAL_SAMPLES.value)
        print(json.dumps({"seed": seed, **per_seed[seed]}), flush=True)
    summary = {"config": run_config.to_dict(), "seeds": seeds, "per_seed": per_seed}
    for phase in ("base", "tuned"):
        keys = sorted(set.intersection(*(set(per_seed[s][phase]) for s in seeds)))
        summary[phase] = {k: {"mean": float(np.mean([per_seed[s][phase][k] for s in seeds])),
                              "std": float(np.std([per_seed[s][phase][k] for s in seeds]))}
                          for k in keys if all(per_seed[s][phase][k] is not None for s in seeds)}
    summary["run_seconds"] = {"mean": float(np.mean([per_seed[s]["run_seconds"] for s in seeds])),
                              "max": float(np.max([per_seed[s]["run_seconds"] for s in seeds]))}
    if eval_seeds:
        summary["rescored"] = {"eval_seeds": eval_seeds, "samples": _EVAL_SAMPLES.value}
        for split, rewards in per_seed[seeds[0]]["rescored"].items():
            for name in rewards:
                gains = [per_seed[s]["rescored"][split][name]["gain"] for s in seeds]
                summary["rescored"].setdefault(split, {})[name] = {
                    "gains": gains, "mean": float(np.mean(gains)), "std": float(np.std(gains)),
                    "stderr": float(np.std(gains, ddof=1) / np.sqrt(len(gains)))
                    if len(gains) > 1 else None,
                    "base_mean": float(np.mean([per_seed[s]["rescored"][split][name]["base"]
                                                for s in seeds]))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("base", "tuned", "run_seconds", "rescored")
                      if k in summary}, indent=2))


if __name__ == "__main__":
    cli.run(main)
