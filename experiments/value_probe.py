"""How well the value model learns a config's reward from the pretrained model's chains.

    python experiments/value_probe.py --config=configs/shapes_compressibility.py \
        --chains=16,48,256 --held_out=64 --updates=16,64,256,1024

Samples chains with the pretrained policy on training prompts (the config's sampler, seed
``train.seed``), scores them with the config's reward, keeps ``--held_out`` chains aside, and
for each C in ``--chains`` fits a fresh value model on the first C of the others, with the
config's value model, optimiser and minibatch size. After each N in ``--updates`` it reports
the explained variance of V on the chains it was fitted on and on the held-out chains
(overall and per quarter of the denoising steps, q1 = the noisiest). Explained variance that
is the same in every quarter means V reads the prompt, not the image. Prints one JSON object
and writes it to ``--out`` when given.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from vard_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_CHAINS = flags.DEFINE_string("chains", "16,48,256", "Training chain counts, comma-separated.")
_HELD_OUT = flags.DEFINE_integer("held_out", 64, "Held-out chains for the explained variance.")
_UPDATES = flags.DEFINE_string("updates", "16,64,256,1024",
                               "Value update counts at which to report, comma-separated.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file to write the result to.")
_GRAD_ALIGNMENT = flags.DEFINE_bool(
    "grad_alignment", False, "Also report the cosine between V's and the reward's gradients "
    "in x_t on the held-out states (differentiable rewards only).")


def _counts(text: str, name: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        cli.fail(f"--{name}={text!r}: expected comma-separated integers, e.g. --{name}=16,64")
    if not values or values[0] < 1:
        cli.fail(f"--{name}={text!r}: expected positive integers, e.g. --{name}=16,64")
    return values


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from vard_jax import prompts as prompts_lib
    from vard_jax.config import ConfigError, validate
    from vard_jax.training.trainer import Trainer
    from vard_jax.training.value_data import EV_BUCKETS

    config = cli.config_or_fail(_CONFIG)
    chain_counts = _counts(_CHAINS.value, "chains")
    update_counts = _counts(_UPDATES.value, "updates")
    if _HELD_OUT.value < 2:
        cli.fail(f"--held_out={_HELD_OUT.value}: needs at least 2 chains")
    try:
        validate(config, jax.device_count())
    except ConfigError as error:
        cli.fail(str(error))
    if config.algorithm != "vard":
        cli.fail(f"config.algorithm = {config.algorithm!r}: the probe fits VARD's value model; "
                 "use a vard config")

    trainer = Trainer(config)
    if _GRAD_ALIGNMENT.value and not trainer.reward.differentiable:
        cli.fail(f"--grad_alignment: reward {trainer.reward.name!r} is not differentiable; "
                 "drop the flag or use a differentiable reward (e.g. clip_alignment)")
    batch = config.sample.batch_size
    needed = chain_counts[-1] + _HELD_OUT.value
    num_batches = -(-needed // batch)
    train_prompts = prompts_lib.load_prompts(config.sample.train_prompts)
    policy_params = trainer.pretrained_policy_params()
    started = time.time()
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 31)
    prompt_batches = [prompts_lib.draw(train_prompts, batch, config.train.seed, 31, b)
                      for b in range(num_batches)]
    rollouts, rewards = trainer.rollouts_with_rewards(policy_params, prompt_batches, key)
    prompts = [p for batch_prompts in prompt_batches for p in batch_prompts]
    sample_seconds = time.time() - started
    total = num_batches * batch
    held_start = total - _HELD_OUT.value
    # Standardised with the statistics of all training chains (decay 0: no history).
    stats = trainer.init_state().reward_stats.update(trainer.put_batch(rewards[:held_start]),
                                                     0.0)
    data = trainer.value_dataset(rollouts, rewards, stats, prompts)

    def chains(start, stop):
        """The dataset rows of chains [start, stop) (value_dataset: T rows per chain)."""
        rows = np.arange(start * trainer.num_steps, stop * trainer.num_steps)
        part = {k: v[rows] for k, v in data.items() if k not in ("context", "reward_ids")}
        part["chain"] = part["chain"] - start
        for per_chain in ("context", "reward_ids"):
            if per_chain in data:
                part[per_chain] = data[per_chain][start:stop]
        return part

    held_data = chains(held_start, total)
    fits = []
    for count in chain_counts:
        # A copy: the value step donates the state's buffers.
        state = trainer.init_state().replace(
            reward_stats=jax.tree_util.tree_map(jnp.copy, stats))
        fit_data = chains(0, count)
        rng = np.random.default_rng([config.train.seed, count, 37])
        done, points = 0, []
        for target in update_counts:
            state, _ = trainer.value_updates(state, fit_data, rng, updates=target - done)
            done = target
            fitted = trainer.value_diagnostics(state, fit_data)
            held = trainer.value_diagnostics(state, held_data)
            point = {
                "updates": target,
                "fit_explained_variance": fitted["value_explained_variance"],
                "held_out_explained_variance": held["value_explained_variance"],
                "held_out_by_quarter": [held[f"value_ev_q{q + 1}"] for q in range(EV_BUCKETS)],
            }
            if _GRAD_ALIGNMENT.value:
                cos = trainer.value_gradient_alignment(state, held_data, prompts[held_start:])
                point["held_out_grad_cosine"] = cos["value_grad_cosine"]
                point["held_out_grad_cosine_by_quarter"] = [
                    cos[f"value_grad_cosine_q{q + 1}"] for q in range(EV_BUCKETS)]
                point["held_out_grad_cosine_positive"] = cos["value_grad_cosine_positive"]
            points.append(point)
        fits.append({"chains": count, "points": points})
    result = {"reward": trainer.reward.name, "num_steps": trainer.num_steps,
              "held_out_chains": _HELD_OUT.value, "reward_mean": float(np.mean(rewards)),
              "reward_std": float(np.std(rewards)), "sample_seconds": round(sample_seconds, 1),
              "seconds": round(time.time() - started, 1), "fits": fits}
    if _OUT.value:
        path = pathlib.Path(_OUT.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
