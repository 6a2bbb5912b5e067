"""VARD vs DDPO vs DRaFT on the shapes world, at equal budgets of reward queries (and VARD vs
Flow-GRPO vs DRaFT on the world's flow model: the ``flow_*`` comparisons, ``--rewards``).

Runs every applicable (reward, method, seed) with ``python -m vard_jax.main`` (one process
per run, so one failure does not end the comparison), then reads each run's
``metrics.jsonl`` and writes:

* ``OUT/results.json``: per run the held-out evaluation curve (reward queries, wall seconds,
  held-out reward, eps distance to the pretrained model); per (reward, method) the final
  held-out reward over seeds; and the two targets of the comparison: the reward queries VARD
  needs to reach DDPO's final held-out reward, and VARD's vs DRaFT's eps distance at equal
  held-out reward, each flagged per seed when its reward level is not above the start
  (``ddpo_final_above_start``, ``above_start``: the target then measures nothing);
* ``OUT/<reward>_vs_queries.png``, ``_vs_wall.png``, ``_vs_distance.png``: the held-out
  reward's gain over the run's step-0 evaluation, with seed bands (mean +- std over seeds;
  matplotlib needed); ``_proxy_vs_gold.png``: the gold program's (``shape_fidelity``)
  held-out gain against the trained reward's, for rewards other than the gold itself. Each seed evaluates its own held-out prompts and noise, shared by the
  methods of that seed.

    PYTHONPATH=. python experiments/compare.py --out=runs/compare            # full: 3 seeds
    PYTHONPATH=. python experiments/compare.py --out=runs/compare_quick --quick   # 1 seed, 2 rewards
    PYTHONPATH=. python experiments/compare.py --out=/tmp/c --smoke          # seconds-scale

A finished run already under ``OUT/runs`` is read, not run again, so an interrupted
comparison continues with the same command. A run is known by its command line (config file
and overrides): after a change to a config file's own settings, use a new ``OUT``. Comparisons made by separate invocations (seeds
or rewards added later, on another machine) are summarised and plotted together, without
running anything, from their ``results.json`` files:

    PYTHONPATH=. python experiments/compare.py --out=runs/all --combine=runs/a,runs/b

(``--seeds`` and ``--rewards`` then select among the runs found; a run that two inputs
hold must be the same run in both.)

A method's setting is compared with the method itself through a named variant: a method plus
config overrides, run on every reward the method applies to, under its own name in the
runs, the summary and the plots (``--methods`` picks what runs; a variant of VARD gets the
two targets computed for it too, under ``variants`` in the reward's summary):

    PYTHONPATH=. python experiments/compare.py --out=runs/replay --budget=512 --evals=16 \
      --variant='vard_replay4=vard:--config.value.replay_epochs=4' --methods=ddpo,vard_replay4

Budgets: every method gets ``--budget`` reward queries for training. VARD spends
``value.pretrain_epochs`` batches of them on value pre-training, DDPO one batch per epoch,
DRaFT one batch per update (its reward is evaluated inside the differentiable rollout).
Method settings are each method's own defaults in ``vard_jax/schema.py`` (DDPO as ddpo-pytorch
runs it: clip 1e-4, per-prompt reward buffers, one optimiser step per 4 chains accumulated
over all their steps; DRaFT: K = 1) and the reward's config (``MATRIX``:
VARD's value reads x0_hat and trains on the last 4 epochs' states for the non-differentiable
rewards); all share the demo's sampler and the policy optimiser, at 1e-4 (the shapes configs'
``policy.learning_rate``; DDPO's own ``ddpo.learning_rate`` has the same value).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import NamedTuple, Optional

import numpy as np


class Comparison(NamedTuple):
    config: str  # the reward's experiment config (the value architecture VARD uses for it, ...)
    methods: tuple[str, ...]  # the methods that can train on it (DRaFT: differentiable only)
    reward: str = ""  # the reward trained (default: the comparison's name)


# reward -> its comparison; run_overrides sets the budget, seed and evaluation grid.
MATRIX = {
    "clip_alignment": Comparison("configs/shapes.py", ("vard", "ddpo", "draft")),
    "shape_fidelity": Comparison("configs/shapes_fidelity.py", ("vard", "ddpo")),
    "jpeg_compressibility": Comparison("configs/shapes_compressibility.py", ("vard", "ddpo")),
    # The world's flow-matching model, with Flow-GRPO as the policy-gradient baseline.
    "flow_clip_alignment": Comparison("configs/shapes_flow.py", ("vard", "grpo", "draft"),
                                      "clip_alignment"),
    "flow_jpeg_compressibility": Comparison("configs/shapes_flow_compressibility.py",
                                            ("vard", "grpo"), "jpeg_compressibility"),
}
#: What runs without --rewards: the DDPM model's comparisons.
DEFAULT_REWARDS = ("clip_alignment", "shape_fidelity", "jpeg_compressibility")
#: The policy-gradient baselines that the sample-efficiency target measures VARD against.
POLICY_GRADIENT = ("ddpo", "grpo")
# The program that scores what the prompt asks for, beside every learned or proxy reward:
# its held-out gain against the trained reward's is the over-optimisation plot.
GOLD = "shape_fidelity"
REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("vard", "ddpo", "grpo", "draft")
# Settings the comparison fixes for every run (equal budgets, seeds, evaluation grid): a
# variant may not override them.
FIXED_SETTINGS = ("algorithm", "reward.name", "reward.eval_extra", "train.seed",
                  "train.epochs", "train.eval_every", "checkpoint.every",
                  "value.pretrain_epochs", "sample.batch_size", "sample.batches_per_epoch",
                  "sample.eval_batch_size", "sample.eval_batches", "sample.num_steps",
                  "sample.eval_eta")


class Variant(NamedTuple):
    name: str  # its name in the runs, the summary and the plots
    method: str  # the algorithm it runs (one of METHODS)
    overrides: tuple[str, ...]  # --config.KEY=VALUE arguments added to the method's run


def parse_variant(text: str) -> Variant:
    """``NAME=METHOD:--config.KEY=VALUE [--config.KEY=VALUE ...]`` -> Variant; one line of
    SystemExit naming the problem otherwise."""
    name, _, rest = text.partition("=")
    method, _, overrides = rest.partition(":")
    example = "e.g. --variant='vard_replay4=vard:--config.value.replay_epochs=4'"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name.strip()) or not rest:
        raise SystemExit(f"--variant={text!r}: expected NAME=METHOD:OVERRIDES with a "
                         f"lower-case NAME; {example}")
    name, method = name.strip(), method.strip()
    if name in METHODS:
        raise SystemExit(f"--variant={text!r}: {name!r} is a method's own name; name the "
                         f"variant differently, {example}")
    if method not in METHODS:
        raise SystemExit(f"--variant={text!r}: unknown method {method!r}; choose from "
                         f"{', '.join(METHODS)}")
    arguments = tuple(shlex.split(overrides))
    if not arguments:
        raise SystemExit(f"--variant={text!r}: no overrides; {example}")
    for argument in arguments:
        key = argument[len("--config."):].partition("=")[0]
        if not argument.startswith("--config.") or "=" not in argument or not key:
            raise SystemExit(f"--variant={text!r}: {argument!r} is not --config.KEY=VALUE; "
                             f"{example}")
        if key in FIXED_SETTINGS:
            raise SystemExit(f"--variant={text!r}: {key} is fixed by the comparison (equal "
                             "budgets, seeds and evaluations); drop it from the variant")
    return Variant(name, method, arguments)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--rewards", default="",
                        help="Comparisons to run: " + ", ".join(MATRIX) + " (flow_*: the "
                             "world's flow model, VARD vs Flow-GRPO vs DRaFT).")
    parser.add_argument("--budget", type=int, default=128, help="Reward queries per run.")
    parser.add_argument("--evals", type=int, default=8,
                        help="Held-out evaluations per run besides the one at step 0 (8 at "
                             "the default budget: every epoch, so VARD's reward at 1/4 of the "
                             "budget, after its value pre-training batch, is on the curve).")
    parser.add_argument("--quick", action="store_true",
                        help="One seed, 64 queries, clip_alignment and jpeg_compressibility "
                             "(5 runs; measured 853 s on 2 CPU cores, nothing else running).")
    parser.add_argument("--smoke", action="store_true",
                        help="The tiny config, 2 steps, one reward, one seed: a check of the "
                             "machinery, not a result.")
    parser.add_argument("--variant", action="append", default=[],
                        metavar="NAME=METHOD:OVERRIDES",
                        help="A method with config overrides (space-separated "
                             "--config.KEY=VALUE), run beside the methods under NAME on every "
                             "reward the method applies to; repeatable.")
    parser.add_argument("--methods", default="",
                        help="Comma-separated methods and variant names to run (default: "
                             "every applicable method and every variant).")
    parser.add_argument("--combine", default="",
                        help="Comma-separated output directories of earlier comparisons: "
                             "summarise and plot their runs together into --out, run nothing.")
    args = parser.parse_args(argv)
    if args.combine and (args.quick or args.smoke):
        parser.error("--combine reads finished comparisons; drop --quick/--smoke")
    args.variants = [parse_variant(text) for text in args.variant]
    names = [v.name for v in args.variants]
    if len(set(names)) < len(names):
        raise SystemExit(f"--variant: a name is given twice ({', '.join(names)}); give each "
                         "variant its own name")
    if args.combine and args.variants:
        raise SystemExit("--variant runs a method; --combine runs nothing: drop one of them")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS and m not in names]
    if unknown and not args.combine:  # --combine: --methods selects among the runs found
        raise SystemExit(f"--methods: unknown {unknown}; choose from "
                         f"{', '.join(list(METHODS) + names)}")
    given = args.rewards
    args.rewards = given or ",".join(DEFAULT_REWARDS)
    if args.quick:
        args.seeds, args.budget, args.evals = "0", 64, 4
        args.rewards = given or "clip_alignment,jpeg_compressibility"
    if args.smoke:
        args.seeds, args.budget, args.evals = "0", 8, 1
        args.rewards = given or "clip_alignment"
    return args


def run_epochs(method: str, budget: int, smoke: bool) -> tuple[int, int, int]:
    """(training epochs, value pre-training epochs, batch) of one run at the query budget."""
    batch = 4 if smoke else 16
    pretrain = 1 if method == "vard" else 0  # one batch of value pre-training
    return max(budget // batch - pretrain, 1), pretrain, batch


def run_overrides(reward: str, method: str, seed: int, budget: int, evals: int,
                  smoke: bool) -> list[str]:
    """Command-line overrides of the reward's config (``MATRIX``) for one run at the query
    budget."""
    epochs, pretrain, batch = run_epochs(method, budget, smoke)
    # The same evaluation grid (in epochs) for every method, whatever its pre-training.
    every = max(budget // batch // max(evals, 1), 1)
    reward = MATRIX[reward].reward or reward
    overrides = [f"--config.algorithm={method}", f"--config.reward.name={reward}",
                 f"--config.reward.eval_extra={GOLD if reward != GOLD else ''}",
                 f"--config.train.seed={seed}",
                 f"--config.train.epochs={epochs}", f"--config.train.eval_every={every}",
                 f"--config.checkpoint.every={epochs}", "--config.logging.progress_bar=False",
                 "--config.logging.tensorboard=False"]
    if method == "vard":
        overrides.append(f"--config.value.pretrain_epochs={pretrain}")
    if smoke:
        overrides.append("--config.sample.num_steps=2")
    else:  # 32 held-out images (2 batches of 16) and a 16-image training grid per evaluation
        overrides += ["--config.sample.eval_batch_size=16", "--config.sample.eval_batches=2"]
    return overrides


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned_runs(reward: str, args) -> list[Variant]:
    """The methods and variants to run on ``reward``, in order: the applicable methods, then
    the variants of those methods, each kept when ``--methods`` names it (or names none)."""
    methods = [Variant(m, m, ()) for m in MATRIX[reward].methods]
    methods += [v for v in args.variants if v.method in MATRIX[reward].methods]
    return [v for v in methods if not args.methods or v.name in args.methods]


def run_command(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Runs one training command from the repository root and captures its output."""
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def run_one(out: pathlib.Path, reward: str, method: str, seed: int, args,
            variant: Optional[Variant] = None) -> dict:
    """One training run of ``method`` (or of ``variant``, a method with overrides, under the
    variant's name), or the finished run already in ``out`` (a comparison resumes).

    ``seconds`` is the run's process wall time; for a finished run found from an earlier
    invocation without its ``run.json``, the final ``wall_s`` of its metrics. A finished run
    whose ``run.json`` records other settings (config and overrides) is refused with one
    line, not reused.
    """
    variant = variant or Variant(method, method, ())
    workdir = out / "runs" / f"{reward}-{variant.name}-seed{seed}"
    config = MATRIX[reward].config + (":tiny" if args.smoke else "")
    # What the run is (its config and overrides; not where it is written).
    settings = [f"--config={config}"] + run_overrides(
        reward, variant.method, seed, args.budget, args.evals, args.smoke) + list(
            variant.overrides)
    command = [sys.executable, "-m", "vard_jax.main", f"--workdir={workdir}"] + settings
    record = {"reward": reward, "method": variant.name, "base_method": variant.method,
              "seed": seed, "command": " ".join(command[1:])}
    if variant.overrides:
        record["overrides"] = list(variant.overrides)
    epochs = run_epochs(variant.method, args.budget, args.smoke)[0]
    rows = read_metrics(workdir)
    saved = workdir / "run.json"
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    if previous.get("settings", settings) != settings:
        raise SystemExit(f"{workdir} was run with {' '.join(previous['settings'])!r}, not "
                         "as this comparison would run it; use another --out or variant name")
    if rows and rows[-1]["step"] == epochs and "eval_reward_mean" in rows[-1]:
        seconds = previous.get("seconds", rows[-1]["wall_s"])
        record.update(returncode=0, seconds=seconds, reused=True)
    else:
        env = dict(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / ".jax_cache"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                          env.get("PYTHONPATH", "")]))
        started = time.time()
        result = run_command(command, env)
        record.update(returncode=result.returncode, seconds=round(time.time() - started, 1))
        if result.returncode != 0:
            record["error"] = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            return record
        saved.write_text(json.dumps({"seconds": record["seconds"], "settings": settings}))
        rows = read_metrics(workdir)
    curve = [{"step": r["step"], "reward_queries": r["reward_queries"], "wall_s": r["wall_s"],
              "eval_reward": r["eval_reward_mean"], "eps_distance": r["eval_eps_distance"],
              **({"gold": r[f"eval_{GOLD}_mean"]} if f"eval_{GOLD}_mean" in r else {}),
              **({"diversity": r["eval_diversity"]} if "eval_diversity" in r else {})}
             for r in rows if "eval_reward_mean" in r]
    # Gain over the run's step-0 evaluation: a seed's held-out prompts and noise (hence its
    # base reward) are shared by its methods, so gains across seeds show how training varies,
    # not how the seeds' evaluation sets differ. The summary and the plots both read it.
    for point in curve:
        point["gain"] = point["eval_reward"] - curve[0]["eval_reward"]
        if "gold" in point and reward != GOLD:
            point["gold_gain"] = point["gold"] - curve[0]["gold"]
    record["curve"] = curve
    record["final_eval_reward"] = curve[-1]["eval_reward"]
    record["final_eps_distance"] = curve[-1]["eps_distance"]
    record["reward_queries"] = curve[-1]["reward_queries"]
    return record


def queries_to_reach(curve: list[dict], target: float) -> Optional[int]:
    """The first evaluated reward-query count at which the held-out reward reaches ``target``."""
    for point in curve:
        if point["eval_reward"] >= target:
            return point["reward_queries"]
    return None


def distance_at(curve: list[dict], reward: float) -> Optional[float]:
    """Eps distance where the curve first reaches held-out ``reward`` (linear interpolation)."""
    for before, after in zip(curve, curve[1:]):
        if before["eval_reward"] < reward <= after["eval_reward"]:
            w = (reward - before["eval_reward"]) / (after["eval_reward"] - before["eval_reward"])
            return before["eps_distance"] + w * (after["eps_distance"] - before["eps_distance"])
    if curve and curve[0]["eval_reward"] >= reward:
        return curve[0]["eps_distance"]
    return None


def _targets(runs: list[dict], name: str) -> dict:
    """The comparison's two targets for the VARD runs named ``name`` (VARD or a variant of
    it) against DDPO's and DRaFT's runs of the same seeds, among one reward's ``runs``."""
    vard_runs = {r["seed"]: r for r in runs if r["method"] == name}
    targets: dict = {}
    for baseline in POLICY_GRADIENT:
        pg = [r for r in runs if r["method"] == baseline and r["seed"] in vard_runs]
        if not pg:
            continue
        ratios, above = [], []
        for r in pg:
            needed = queries_to_reach(vard_runs[r["seed"]]["curve"], r["final_eval_reward"])
            ratios.append(None if needed is None else needed / r["reward_queries"])
            # A baseline's final at or below its start is "reached" by VARD's first
            # evaluation: the ratio then says nothing about sample efficiency.
            above.append(bool(r["final_eval_reward"] > r["curve"][0]["eval_reward"]))
        targets[f"vard_queries_to_{baseline}_final_over_{baseline}_queries"] = ratios
        targets[f"{baseline}_final_above_start"] = above
    draft = [r for r in runs if r["method"] == "draft" and r["seed"] in vard_runs]
    if draft:
        pairs = []
        for r in draft:
            vard_curve = vard_runs[r["seed"]]["curve"]
            level = min(vard_curve[-1]["eval_reward"], r["final_eval_reward"])
            # Defined only where both runs gained: at or below the (shared) step-0 reward, a
            # curve "reaches" the level at its start, at distance 0.
            pairs.append({"seed": r["seed"], "reward_level": level,
                          "above_start": bool(level > r["curve"][0]["eval_reward"]),
                          "vard_eps_distance": distance_at(vard_curve, level),
                          "draft_eps_distance": distance_at(r["curve"], level)})
        targets["eps_distance_at_equal_reward"] = pairs
    return targets


def summarise(records: list[dict]) -> dict:
    """Per reward: each method's (and variant's) final held-out reward and gain over seeds,
    and the two targets for VARD (flat keys) and for each variant of VARD (``variants``)."""
    ok = [r for r in records if r.get("returncode") == 0]
    summary: dict = {}
    for reward in sorted({r["reward"] for r in ok}):
        methods = {}
        for method in sorted({r["method"] for r in ok if r["reward"] == reward}):
            runs = [r for r in ok if r["reward"] == reward and r["method"] == method]
            finals = [r["final_eval_reward"] for r in runs]
            gains = [r["curve"][-1]["gain"] for r in runs]
            methods[method] = {"seeds": [r["seed"] for r in runs],
                               "final_eval_reward_mean": float(np.mean(finals)),
                               "final_eval_reward_std": float(np.std(finals)),
                               "final_gain_mean": float(np.mean(gains)),
                               "final_gain_std": float(np.std(gains)),
                               "final_eps_distance_mean": float(np.mean(
                                   [r["final_eps_distance"] for r in runs])),
                               "seconds_mean": float(np.mean([r["seconds"] for r in runs]))}
            golds = [r["curve"][-1]["gold_gain"] for r in runs if "gold_gain" in r["curve"][-1]]
            if len(golds) == len(runs):
                methods[method].update(final_gold_gain_mean=float(np.mean(golds)),
                                       final_gold_gain_std=float(np.std(golds)))
            spread = [(r["curve"][0]["diversity"], r["curve"][-1]["diversity"]) for r in runs
                      if "diversity" in r["curve"][-1]]
            if len(spread) == len(runs):
                methods[method]["diversity_start_final"] = np.mean(spread, 0).tolist()
        entry = {"methods": methods}
        vard_family = sorted({r["method"] for r in ok if r["reward"] == reward
                              and r.get("base_method", r["method"]) == "vard"})
        for name in vard_family:
            targets = _targets([r for r in ok if r["reward"] == reward], name)
            if name == "vard":
                entry.update(targets)
            elif targets:
                entry.setdefault("variants", {})[name] = targets
        summary[reward] = entry
    return summary


def plot(records: list[dict], out: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    ok = [r for r in records if r.get("returncode") == 0]
    for reward in sorted({r["reward"] for r in ok}):
        for x_key, label, suffix in (("reward_queries", "reward queries", "queries"),
                                     ("wall_s", "wall-clock seconds", "wall"),
                                     ("eps_distance", "eps distance to the pretrained model",
                                      "distance")):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for method in sorted({r["method"] for r in ok if r["reward"] == reward}):
                runs = [r["curve"] for r in ok if r["reward"] == reward and r["method"] == method]
                length = min(len(c) for c in runs)
                xs = np.array([[p[x_key] for p in c[:length]] for c in runs])
                ys = np.array([[p["gain"] for p in c[:length]] for c in runs])
                x, mean, std = xs.mean(0), ys.mean(0), ys.std(0)
                ax.plot(x, mean, marker="o", label=f"{method} ({len(runs)} seeds)")
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            ax.set_xlabel(label)
            ax.set_ylabel(f"held-out {reward}\ngain over step 0")
            ax.legend()
            fig.tight_layout()
            path = out / f"{reward}_vs_{suffix}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path.name)
        gold_runs = [r for r in ok if r["reward"] == reward
                     and all("gold_gain" in p for p in r["curve"])]
        if gold_runs:
            written.append(_plot_gold(plt, reward, gold_runs, out))
    return written


def _plot_gold(plt, reward: str, runs: list[dict], out: pathlib.Path) -> str:
    """Held-out gold gain against the trained reward's gain, one line per method (mean over
    seeds, one point per evaluation): a curve that bends down is over-optimisation."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in sorted({r["method"] for r in runs}):
        curves = [r["curve"] for r in runs if r["method"] == method]
        length = min(len(c) for c in curves)
        xs = np.array([[p["gain"] for p in c[:length]] for c in curves]).mean(0)
        ys = np.array([[p["gold_gain"] for p in c[:length]] for c in curves])
        ax.errorbar(xs, ys.mean(0), yerr=ys.std(0), marker="o", capsize=2,
                    label=f"{method} ({len(curves)} seeds)")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel(f"held-out {reward} gain (trained reward)")
    ax.set_ylabel(f"held-out {GOLD} gain (gold)")
    ax.legend()
    fig.tight_layout()
    path = out / f"{reward}_proxy_vs_gold.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def combined_records(directories: list[str], seeds: list[int], rewards: list[str],
                     methods: Optional[list[str]] = None) -> tuple[int, list[dict]]:
    """(budget, the finished runs) of earlier comparisons' ``results.json`` files, selected by
    seed, reward and (when given) method or variant name; one line of SystemExit for a missing
    file, mixed budgets or two different runs under one (reward, method, seed)."""
    budgets, runs = {}, {}
    if not directories:
        raise SystemExit("--combine: no directories given; e.g. --combine=runs/a,runs/b")
    for directory in directories:
        path = pathlib.Path(directory) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--combine: {path} not found; pass directories that "
                             "experiments/compare.py wrote")
        results = json.loads(path.read_text())
        budgets[directory] = results["budget"]
        for record in results["runs"]:
            if record.get("returncode") != 0 or record["seed"] not in seeds or (
                    record["reward"] not in rewards) or (methods and
                                                         record["method"] not in methods):
                continue
            key = (record["reward"], record["method"], record["seed"])
            if key in runs and runs[key][1]["curve"] != record["curve"]:
                raise SystemExit(f"--combine: {'-'.join(map(str, key))} differs between "
                                 f"{runs[key][0]} and {directory}; pass only one of them")
            runs.setdefault(key, (directory, record))
    if len(set(budgets.values())) > 1:
        raise SystemExit(f"--combine: budgets differ ({budgets}); combine equal budgets only")
    if not runs:
        raise SystemExit(f"--combine: no finished run of seeds {seeds} and rewards {rewards}"
                         + (f" and methods {methods}" if methods else "")
                         + " in those directories; check --seeds, --rewards and --methods")
    return next(iter(budgets.values())), [record for _, record in runs.values()]


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()]
    unknown = [r for r in rewards if r not in MATRIX]
    if unknown:
        raise SystemExit(f"--rewards: unknown {unknown}; choose from {', '.join(MATRIX)}")
    if args.combine:
        sources = [d.strip() for d in args.combine.split(",") if d.strip()]
        if any(pathlib.Path(d).resolve() == out.resolve() for d in sources):
            raise SystemExit(f"--combine: --out={out} is one of the inputs; its results.json "
                             "would be overwritten: write to a new directory")
        budget, records = combined_records(sources, seeds, rewards, args.methods)
        seeds = sorted({r["seed"] for r in records})
        out.mkdir(parents=True, exist_ok=True)
    else:
        for variant in args.variants:
            if not any(variant.method in MATRIX[r].methods for r in rewards):
                raise SystemExit(f"--variant {variant.name}: {variant.method} applies to none "
                                 f"of the rewards {rewards}; drop it or add a reward it "
                                 "applies to")
        if not any(planned_runs(r, args) for r in rewards):
            raise SystemExit(f"--methods={','.join(args.methods)}: nothing to run on the "
                             f"rewards {rewards}; name a method that applies to them")
        sources, budget, records = [], args.budget, []
        out.mkdir(parents=True, exist_ok=True)  # after the checks: bad input leaves nothing
        # Seed outermost: a comparison stopped part-way has whole seeds of every (reward,
        # method).
        for seed in seeds:
            for reward in rewards:
                for variant in planned_runs(reward, args):
                    record = run_one(out, reward, variant.method, seed, args, variant)
                    print(json.dumps({k: record.get(k) for k in (
                        "reward", "method", "seed", "returncode", "seconds",
                        "final_eval_reward", "error")}), flush=True)
                    records.append(record)
    results = {"budget": budget, "seeds": seeds, "smoke": args.smoke, "quick": args.quick,
               "summary": summarise(records), "runs": records}
    if sources:
        results["combined_from"] = sources
    if args.variants:
        results["variants"] = {v.name: {"method": v.method, "overrides": list(v.overrides)}
                               for v in args.variants}
    results["plots"] = plot(records, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    return results


if __name__ == "__main__":
    main()
