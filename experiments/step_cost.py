"""What skipped steps cost: VARD's step subsampling and AlignProp's drawn depth, timed.

    PYTHONPATH=. .venv/bin/python experiments/step_cost.py [--steps=10] [--batch=16]
        [--repeats=5] [--fraction=0.25] [--remat=none|full|dots] [--parts=vard,alignprop]
        [--out=FILE]

Prints one JSON object (and writes it to ``--out``). On ``configs/shapes.py`` with T steps:

* ``vard``: mean seconds per ``Trainer.policy_step`` (K = 1, a new key per update, so new
  trained steps) with every step trained and with ``policy.train_fraction = --fraction`` (the
  other steps run forward only, those after the last trained one not at all), and their ratio.
* ``alignprop``: seconds per gradient of ``draft.draft_value_and_grad_random_depth`` (one
  compiled function, the depth K a traced input) at K = 1, T/2 and T, in its two forms:
  ``by_hand`` (reverse mode over the drawn steps in a loop, the form on GPU/TPU) and
  ``gated`` (the unrolled chain, the cut chosen by ``where``: the form on CPU); and of
  ``draft.draft_loss`` at the static K = T; ratios to the static K = T.

Each figure is over ``--repeats`` runs after compilation and a warm-up call (VARD: the
mean, AlignProp: the median); the variants alternate
within each repeat, so that they see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _config(steps: int, batch: int, fraction: float):
    from configs import shapes

    config = shapes.get_config()
    config.sample.num_steps = steps
    config.sample.batch_size = batch
    config.policy.train_fraction = fraction
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _alternate(jobs: dict[str, Callable[[], Any]], repeats: int,
               reduce: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(_timed(job))
    return {name: reduce(values) for name, values in times.items()}


def vard_policy_steps(steps: int, batch: int, fraction: float, repeats: int,
                      remat: str = "") -> dict:
    """Seconds per policy step, every step trained vs. ``fraction`` of them."""
    from vard_jax.training.trainer import Trainer

    prompts = ["two red circles on a white background"] * batch
    jobs, compile_s = {}, {}
    for name, f in (("all_steps", 1.0), (f"fraction_{fraction:g}", fraction)):
        config = _config(steps, batch, f)
        if remat:
            config.policy.remat = remat
        trainer = Trainer(config)
        state = trainer.init_state()
        ids = trainer.put_batch({"ids": jnp.asarray(trainer.pipeline.tokenize(prompts))})
        # A new key per update, as in training: the trained steps (and so the cost) are drawn
        # per update; both variants see the same keys.
        keys = [trainer.put_key(jax.random.PRNGKey(r)) for r in range(repeats + 1)]
        args = (trainer.frozen, trainer.reference_params, ids)
        start = time.perf_counter()
        compiled = trainer.policy_step.lower(state, *args, keys[0]).compile()
        compile_s[name] = time.perf_counter() - start
        box = {"state": state, "calls": 0}

        def job(compiled=compiled, box=box, args=args, keys=keys):
            key = keys[box["calls"] % len(keys)]
            box["calls"] += 1
            box["state"], metrics = compiled(box["state"], *args, key)  # the state is donated
            return metrics

        jobs[name] = job
        print(f"compiled {name} in {compile_s[name]:.0f} s", file=sys.stderr)
    for job in jobs.values():  # a first call each (warm-up, key 0)
        _timed(job)
    seconds = _alternate(jobs, repeats, statistics.mean)  # the expected cost per update
    names = list(seconds)
    return {"seconds": seconds, "compile_s": compile_s,
            "ratio": seconds[names[1]] / seconds[names[0]]}


def alignprop_gradients(steps: int, batch: int, repeats: int,
                        parts: tuple[str, ...] = ("by_hand", "gated")) -> dict:
    """Seconds per AlignProp gradient at drawn depths K = 1, T/2, T (one compiled function per
    form in ``parts``), and per gradient of DRaFT's static K = T."""
    from vard_jax.algorithms import draft
    from vard_jax.diffusion import rollout as rollout_lib
    from vard_jax.training.trainer import Trainer

    config = _config(steps, batch, 1.0)
    config.algorithm = "draft"
    trainer = Trainer(config)
    pipeline, policy, reward = trainer.pipeline, trainer.policy, trainer.reward
    prompts = ["two red circles on a white background"] * batch
    ids = jnp.asarray(pipeline.tokenize(prompts))
    reward_input = jnp.asarray(reward.prepare(prompts))
    loss_config = draft.DraftConfig(
        grad_depth=None, beta=0.0, eta=config.sample.eta,
        guidance_scale=config.sample.guidance_scale, remat=config.policy.remat,
        unroll=rollout_lib.resolve_unroll(config.policy.scan_unroll))

    def gradient_of(loss, returns_grads=False):
        def gradient(params, frozen, reference, key, depth):
            context = pipeline.encode_ids(frozen["text_encoder"], ids)
            null_context = pipeline.encode_ids(frozen["text_encoder"], trainer.null_ids)
            x_T, noise = rollout_lib.sample_noise(key, batch, steps, pipeline.sample_shape)
            inputs = draft.DraftInputs(context=context, null_context=null_context, x_T=x_T,
                                       noise=noise)

            def reward_fn(x0):
                return reward.score(pipeline.decode(frozen, x0), reward_input)

            args = (policy.eps_fn, policy.unet(params, reference),
                    policy.reference_unet(reference), trainer.policy_schedule, inputs, reward_fn)
            if returns_grads:  # (loss, metrics, grads); full fine-tuning: UNet = policy
                return loss(*args, depth=depth)[2]
            return jax.grad(lambda p: loss(
                policy.eps_fn, policy.unet(p, reference), *args[2:], depth=depth)[0])(params)

        return jax.jit(gradient)

    variants = {  # the two forms of the drawn depth (``draft.draft_value_and_grad_random_depth``)
        "by_hand": gradient_of(lambda *a, depth: draft.draft_value_and_grad_random_depth(
            *a, loss_config._replace(unroll=1), depth), returns_grads=True),
        "gated": gradient_of(lambda *a, depth: draft.draft_value_and_grad_random_depth(
            *a, loss_config._replace(unroll=True), depth), returns_grads=True),
    }
    # The baseline: DRaFT's static full depth (no traced depth).
    static = gradient_of(lambda *a, depth: draft.draft_loss(
        *a, loss_config._replace(grad_depth=steps)))

    params = trainer.pretrained_policy_params()
    key = jax.random.PRNGKey(0)
    args = (params, trainer.frozen, trainer.reference_params, key)
    compile_s, jobs = {}, {}
    depths = sorted({1, max(1, steps // 2), steps})
    for name, fn in variants.items():
        if name not in parts:
            continue
        start = time.perf_counter()
        compiled = fn.lower(*args, jnp.int32(1)).compile()
        compile_s[name] = time.perf_counter() - start
        print(f"compiled {name} in {compile_s[name]:.0f} s", file=sys.stderr, flush=True)
        for k in depths:
            jobs[f"{name}_K={k}"] = lambda k=k, compiled=compiled: compiled(*args, jnp.int32(k))
    start = time.perf_counter()
    static_compiled = static.lower(*args, jnp.int32(steps)).compile()
    compile_s[f"static_K={steps}"] = time.perf_counter() - start
    jobs[f"static_K={steps}"] = lambda: static_compiled(*args, jnp.int32(steps))
    for job in jobs.values():  # warm-up
        _timed(job)
    seconds = _alternate(jobs, repeats)
    full = seconds[f"static_K={steps}"]
    return {"seconds": seconds, "compile_s": compile_s,
            "ratio_to_static_full_depth": {name: s / full for name, s in seconds.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--remat", default="", help="policy.remat (default: the config's)")
    parser.add_argument("--parts", default="vard,alignprop", help="what to time")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    if not parts or set(parts) - {"vard", "alignprop"}:
        parser.error(f"--parts={args.parts!r}: use vard, alignprop or both, comma-separated")
    result = {"backend": jax.default_backend(), "devices": jax.device_count(),
              "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
              "remat": args.remat or _config(args.steps, args.batch, 1.0).policy.remat}
    if "vard" in parts:
        result["vard"] = vard_policy_steps(args.steps, args.batch, args.fraction, args.repeats,
                                           args.remat)
        print(json.dumps({"vard": result["vard"]}), file=sys.stderr, flush=True)
    if "alignprop" in parts:
        result["alignprop"] = alignprop_gradients(args.steps, args.batch, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
