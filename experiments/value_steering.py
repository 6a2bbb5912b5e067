"""The value at sampling time on the shapes world: base sampling, best-of-N, value guidance and
value-steered SMC, with the base model and with a VARD-tuned one, over seeds.

    PYTHONPATH=. python experiments/value_steering.py --reward=clip_alignment \\
        --tuned=runs/seeds_shapes --value_only=runs/seeds_shapes_value --out=runs/steer_clip

``--tuned`` holds VARD runs (``seed_<s>/``, e.g. from experiments/seeds.py); their policy is
steered by their own value. ``--value_only`` holds runs of ``--config.algorithm=value`` on the
same config (a value trained on the base model's samples); the pretrained model is steered by
it. Every method samples the run's held-out prompts (``--num_prompts``) with the same noise
seed; the figures per method are the trained reward, the gold ``shape_fidelity`` (the shapes
world's program) and ``clip_alignment``, the UNet calls per output image and the sampling
seconds per output image (after a warm-up call: compiling excluded). SMC's figures are each
prompt's particles averaged under their final weights (the expectation under the steered
distribution); best-of-N's are the chosen sample's.

Guidance strength and SMC temperature are chosen first on the *training* prompts of seed 0
(``--lambdas``, ``--temperatures``; highest trained reward, the base model steered by the
value-only run's value), then fixed for the table; ``--fixed=LAMBDA,T`` skips the choice
(e.g. to add ``--models=vard`` later with an earlier invocation's values). Prints and writes
``OUT/results.json`` with per-seed figures and mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

GOLD = "shape_fidelity"
PROXY_EXTRA = "clip_alignment"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="the runs' trained reward (for labels)")
    parser.add_argument("--tuned", required=True, help="directory of VARD runs seed_<s>/")
    parser.add_argument("--value_only", required=True,
                        help="directory of value-only runs seed_<s>/ (algorithm=value)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--batch_prompts", type=int, default=8,
                        help="prompts per sampling batch (rows: this times the particles)")
    parser.add_argument("--lambdas", default="1,4,16")
    parser.add_argument("--temperatures", default="0.25,1")
    parser.add_argument("--models", default="base,vard",
                        help="which models to steer: base (with --value_only's value), vard")
    parser.add_argument("--fixed", default="",
                        help="LAMBDA,T: use these instead of choosing them (e.g. the values an "
                             "earlier invocation chose, to add the other model)")
    parser.add_argument("--combined", action="store_true",
                        help="also SMC with value guidance in its proposal")
    return parser.parse_args(argv)


def restore(trainer, workdir: pathlib.Path):
    from vard_jax.training.checkpoints import Checkpointer, abstract_with_shardings

    checkpointer = Checkpointer(workdir / "checkpoints", 1_000_000)
    try:
        abstract = abstract_with_shardings(trainer.abstract_state,
                                           trainer.state_shardings(trainer.abstract_state))
        state, step = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return state, int(step)


class Methods:
    """The compiled samplers of every method, shared by the seeds (one trainer)."""

    def __init__(self, trainer, particles: int, guidance: float, temperature: float,
                 combined: bool):
        from vard_jax.training.value_sampling import SteeringSpec, ValueSampler

        n = particles
        self.n = n
        self.specs = {
            "base": SteeringSpec(),
            "guidance": SteeringSpec(value_guidance=guidance),
            f"best_of_{n}": SteeringSpec(particles=n, resample_every=0),
            f"smc_{n}": SteeringSpec(particles=n, temperature=temperature),
        }
        if combined:
            self.specs[f"smc_{n}+guidance"] = SteeringSpec(particles=n, temperature=temperature,
                                                           value_guidance=guidance)
        self.samplers = {name: ValueSampler(trainer, spec) for name, spec in self.specs.items()}


def run_method(trainer, sampler, spec, policy_params, state, prompts, batch_prompts, seed):
    """Figures of one method: {label: {reward name: mean}}, seconds per output image."""
    from vard_jax.diffusion import steering as steering_lib
    from vard_jax.training import evaluation, value_sampling

    n = spec.particles
    # warm-up (compile) on one batch, then the timed pass
    value_sampling.sample_all(sampler, policy_params, state.value_params, state.reward_stats,
                              prompts[:batch_prompts], batch_prompts, seed)
    started = time.time()
    batch = value_sampling.sample_all(sampler, policy_params, state.value_params,
                                      state.reward_stats, prompts, batch_prompts, seed)
    seconds = (time.time() - started) / len(prompts)
    scores = evaluation.score_images(trainer, batch.images, batch.prompts)
    names = [trainer.reward.name] + [k for k in (GOLD, PROXY_EXTRA)
                                     if k in scores and k != trainer.reward.name]
    out = {}
    if n == 1:
        out[""] = {k: float(np.mean(scores[k])) for k in names}
    elif spec.resample_every == 0:
        for by, key in (("reward", scores[trainer.reward.name]), ("value", batch.final_value)):
            rows = steering_lib.best_of(key, n)
            out[f" by {by}"] = {k: float(np.mean(scores[k][rows])) for k in names}
    else:
        out[""] = {k: float(np.mean(steering_lib.weighted_mean(scores[k], batch.log_weights, n)))
                   for k in names}
        out[""]["resampled_fraction"] = float(np.mean(batch.resampled[:-1]))
    return out, seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    from vard_jax import prompts as prompts_lib
    from vard_jax.config import with_defaults
    from vard_jax.training.checkpoints import Checkpointer
    from vard_jax.training.trainer import Trainer
    from vard_jax.training.value_sampling import unet_calls_per_image

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tuned_dir, value_dir, out = (pathlib.Path(args.tuned), pathlib.Path(args.value_only),
                                 pathlib.Path(args.out))
    # the value-only runs' config: the tuned runs' one but for config.algorithm
    checkpointer = Checkpointer(value_dir / f"seed_{seeds[0]}" / "checkpoints", 1_000_000)
    config = with_defaults(checkpointer.restore_config(checkpointer.latest_step()))
    checkpointer.close()
    config.sample.eval_batch_size = args.batch_prompts * args.particles
    trainer = Trainer(config)
    pretrained = trainer.pretrained_policy_params()

    # 1. guidance strength and temperature on seed 0's training prompts
    train_prompts = prompts_lib.fixed(prompts_lib.load_prompts(config.sample.train_prompts),
                                      2 * args.batch_prompts, seeds[0])
    state, _ = restore(trainer, value_dir / f"seed_{seeds[0]}")
    from vard_jax.training.value_sampling import SteeringSpec, ValueSampler

    tuning = {}
    if args.fixed:
        guidance, temperature = (float(v) for v in args.fixed.split(","))
        args.lambdas = args.temperatures = ""
    for lam in [float(v) for v in args.lambdas.split(",") if v]:
        spec = SteeringSpec(value_guidance=lam)
        figures, _ = run_method(trainer, ValueSampler(trainer, spec), spec, pretrained, state,
                                train_prompts, args.batch_prompts, 1)
        tuning[f"guidance {lam:g}"] = figures[""][trainer.reward.name]
    for t in [float(v) for v in args.temperatures.split(",") if v]:
        spec = SteeringSpec(particles=args.particles, temperature=t)
        figures, _ = run_method(trainer, ValueSampler(trainer, spec), spec, pretrained, state,
                                train_prompts, args.batch_prompts, 1)
        tuning[f"smc T={t:g}"] = figures[""][trainer.reward.name]
    if not args.fixed:
        guidance = max((v, float(k.split()[1])) for k, v in tuning.items()
                       if k.startswith("guidance"))[1]
        temperature = max((v, float(k.split("=")[1])) for k, v in tuning.items()
                          if k.startswith("smc"))[1]
    print(json.dumps({"tuning_on_training_prompts": tuning, "guidance": guidance,
                      "temperature": temperature}), flush=True)

    # 2. the table on held-out prompts
    methods = Methods(trainer, args.particles, guidance, temperature, args.combined)
    per_seed: dict = {}
    for seed in seeds:
        held_out = prompts_lib.fixed(prompts_lib.load_prompts(config.sample.eval_prompts),
                                     args.num_prompts, seed)
        models = [m for m in (("base", value_dir), ("vard", tuned_dir))
                  if m[0] in args.models.split(",")]
        for model, workdir in models:
            state, step = restore(trainer, workdir / f"seed_{seed}")
            policy_params = pretrained if model == "base" else state.policy_params
            for name, spec in methods.specs.items():
                figures, seconds = run_method(trainer, methods.samplers[name], spec,
                                              policy_params, state, held_out,
                                              args.batch_prompts, 1000 + seed)
                for suffix, values in figures.items():
                    row = {**values, "seconds_per_image": seconds,
                           "unet_calls_per_image": unet_calls_per_image(config, spec)}
                    per_seed.setdefault(f"{model} | {name}{suffix}", {})[seed] = row
                    print(json.dumps({"seed": seed, "model": model, "method": name + suffix,
                                      "checkpoint": step, **row}), flush=True)
    table = {}
    for label, by_seed in per_seed.items():
        keys = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        table[label] = {k: {"mean": float(np.mean([by_seed[s][k] for s in by_seed])),
                            "std": float(np.std([by_seed[s][k] for s in by_seed]))}
                        for k in keys}
    results = {"reward": args.reward, "seeds": seeds, "particles": args.particles,
               "num_prompts": args.num_prompts, "guidance": guidance,
               "temperature": temperature, "tuning_on_training_prompts": tuning,
               "table": table, "per_seed": per_seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for label, figures in table.items():
        print(label, {k: f"{v['mean']:.3f}+-{v['std']:.3f}" for k, v in figures.items()})


if __name__ == "__main__":
    main()
