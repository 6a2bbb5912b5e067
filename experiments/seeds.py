"""Runs a config over several seeds and reports base vs. fine-tuned evaluation figures.

    python experiments/seeds.py --config=configs/shapes.py --seeds=0,1,2 --out=runs/seeds_shapes

Each seed is a full run of ``vard_jax.main``'s loop in ``OUT/seed_<s>``; the base model's
figures are the step-0 evaluation of the same run (same prompts and noise as the final one).
Prints one JSON object (mean and std over seeds of every eval metric, base and tuned, and the
wall time per run) and writes it to ``OUT/summary.json``.
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


def main(argv):
    del argv
    import jax

    from vard_jax.config import ConfigError, validate
    from vard_jax.training.loop import Loop

    config = cli.config_or_fail(_CONFIG)
    if not _OUT.value:
        cli.fail("--out is required")
    out = pathlib.Path(_OUT.value)
    seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
    per_seed = {}
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
        print(json.dumps({"seed": seed, **per_seed[seed]}), flush=True)
    summary = {"config": run_config.to_dict(), "seeds": seeds, "per_seed": per_seed}
    for phase in ("base", "tuned"):
        keys = sorted(set.intersection(*(set(per_seed[s][phase]) for s in seeds)))
        summary[phase] = {k: {"mean": float(np.mean([per_seed[s][phase][k] for s in seeds])),
                              "std": float(np.std([per_seed[s][phase][k] for s in seeds]))}
                          for k in keys if all(per_seed[s][phase][k] is not None for s in seeds)}
    summary["run_seconds"] = {"mean": float(np.mean([per_seed[s]["run_seconds"] for s in seeds])),
                              "max": float(np.max([per_seed[s]["run_seconds"] for s in seeds]))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("base", "tuned", "run_seconds")}, indent=2))


if __name__ == "__main__":
    cli.run(main)
