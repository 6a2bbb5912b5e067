"""Runs in subprocesses of ``tests/test_parallel.py`` (JAX must start with their device setup).

    python tests/parallel_worker.py meshes OUT.json
        (XLA_FLAGS=--xla_force_host_platform_device_count=8) one epoch's pieces (sampling, host
        reward, value update, policy update) on one device and on two meshes of 8 devices.
    python tests/parallel_worker.py multiprocess OUT.json WORKDIR PORT PROCESS_ID
        one of two processes of a jax.distributed run on localhost: two epochs of the loop with
        checkpoints, then a restore of the last one.

Both write a JSON report of measured numbers; the test asserts on them. The UNet is shrunk to one
block (random weights) so that compiling for three meshes fits in the test budget: the sharding
code does not depend on the UNet's size.
"""

from __future__ import annotations

import gc
import json
import pathlib
import resource
import sys
import tempfile
import time

import jax
import numpy as np

from configs import shapes
from vard_jax.models import shapes as shapes_model

# Two blocks instead of three; the 64-channel one keeps kernels (3x3x64x64) above the size at
# which parameters are sharded, and attention stays off the full 32x32 resolution.
SMALL_UNET = dict(shapes_model.UNET_CONFIG, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def _log(message: str) -> None:
    """Progress on stderr (the test shows it when the worker fails)."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"[{time.strftime('%H:%M:%S')} peak {peak_mb} MB] {message}", file=sys.stderr, flush=True)


def tiny_config(data: int = -1, fsdp: int = 1, batch: int = 8):
    config = shapes.get_config("tiny")
    config.pretrained.random_init = True
    config.reward.eval_extra = ""
    config.sample.num_steps = 2
    config.sample.batch_size = batch
    config.sample.eval_batch_size = batch
    config.value.batch_size = 8
    config.logging.tensorboard = False
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


def _spec(array) -> str:
    return str(array.sharding.spec) if hasattr(array.sharding, "spec") else "single-device"


def _sharded_leaves(tree) -> list[dict]:
    """Leaves split over ``fsdp``: their spec and the shape of one device's shard."""
    out = []
    for leaf in jax.tree_util.tree_leaves(tree):
        if "fsdp" in _spec(leaf):
            out.append({"shape": list(leaf.shape), "spec": _spec(leaf),
                        "shard": list(leaf.addressable_shards[0].data.shape)})
    return out


def _max_abs_diff(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in leaves)


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree_util.tree_leaves(tree))))


def _relative_update_diff(after, base_after, base_before) -> float:
    """|after - base_after| / |base_after - base_before| (L2 over all leaves): how far a run's
    update is from the one-device update, relative to that update. Adam turns gradients that
    are zero up to rounding into steps of any size, so a maximum over elements is not robust."""
    difference = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - b, after,
                                        base_after)
    update = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - b, base_after,
                                    base_before)
    return _norm(difference) / _norm(update)


def one_epoch(data: int, fsdp: int, devices) -> dict:
    """Sampling, host reward, value stage and policy stage of one epoch on the given mesh."""
    from vard_jax.parallel import mesh as mesh_lib
    from vard_jax.training.loop import Loop
    from vard_jax.training.trainer import Trainer

    config = tiny_config(data, fsdp)
    trainer = Trainer(config, devices=devices)
    loop = Loop(config, tempfile.mkdtemp(), trainer=trainer)
    state = trainer.init_state()
    initial = mesh_lib.to_host(state)
    _log(f"mesh {dict(trainer.mesh.shape)}: state placed")
    key = jax.random.PRNGKey(3)
    rollouts, rewards, prompts = loop.stage.collect(state, (0, 0), key)
    _log("sampled and rewarded")
    placed = trainer.put_batch(rewards)
    shards_match = all(np.array_equal(np.asarray(shard.data), rewards[shard.index])
                       for shard in placed.addressable_shards)
    state, _ = loop.stage.value_update(state, rollouts, rewards, prompts, (0, 0))
    after_value = mesh_lib.to_host(state)
    _log("value stage done")
    state, policy_metrics = loop.stage.policy_update(state, prompts, jax.random.PRNGKey(4))
    final = mesh_lib.to_host(state)
    _log("policy stage done")
    # Value-steered sampling (guided SMC, 2 particles a prompt) on the trained value.
    from vard_jax.training import value_sampling

    sampler = value_sampling.ValueSampler(trainer, value_sampling.SteeringSpec(
        value_guidance=0.5, particles=2, temperature=0.5))
    half = config.sample.batch_size // 2
    steered = sampler.sample(state.policy_params, state.value_params, state.reward_stats,
                             prompts[0][:half], jax.random.PRNGKey(5))
    _log("steered sampling done")
    state_specs = jax.tree_util.tree_map(_spec, state)
    expected_specs = jax.tree_util.tree_map(
        lambda s: str(s.spec), trainer.state_shardings(trainer.abstract_state))
    return {
        "mesh": dict(trainer.mesh.shape),
        "images": mesh_lib.to_host(rollouts[0].images),
        "rewards": rewards,
        "rewards_spec": _spec(placed),
        "reward_shards_match": shards_match,
        "rollout_spec": _spec(rollouts[0].images),
        "initial": initial, "after_value": after_value, "final": final,
        "policy_loss": policy_metrics["policy_loss"],
        "policy_grad_norm": policy_metrics["policy_grad_norm"],
        "policy_sharded": _sharded_leaves(state.policy_params),
        "opt_sharded": len(_sharded_leaves(state.policy_opt_state)),
        "value_sharded": len(_sharded_leaves(state.value_params)),
        "policy_leaves": len(jax.tree_util.tree_leaves(state.policy_params)),
        "reference_sharded": len(_sharded_leaves(trainer.reference_params)),
        "state_specs_as_declared": state_specs == expected_specs,
        "steered_images": steered.images, "steered_log_weights": steered.log_weights,
        "steered_resampled": steered.resampled,
    }


def run_meshes(out: pathlib.Path) -> None:
    shapes_model.UNET_CONFIG = SMALL_UNET
    devices = jax.devices()
    assert len(devices) == 8, devices
    report = {"device_count": len(devices), "meshes": {}}
    began = time.time()
    base = one_epoch(1, 1, devices[:1])
    report["one_device_s"] = time.time() - began
    for data, fsdp in ((8, 1), (2, 4)):
        gc.collect()  # the previous mesh's trainer and its executables
        began = time.time()
        run = one_epoch(data, fsdp, devices)
        item = {key: run[key] for key in ("mesh", "rewards_spec", "reward_shards_match",
                                          "rollout_spec", "policy_sharded", "opt_sharded",
                                          "value_sharded", "policy_leaves", "reference_sharded",
                                          "state_specs_as_declared")}
        item["seconds"] = time.time() - began
        item["initial_diff"] = _max_abs_diff(run["initial"], base["initial"])
        item["images_diff"] = _max_abs_diff(run["images"], base["images"])
        item["rewards_diff"] = _max_abs_diff(run["rewards"], base["rewards"])
        for stage in ("after_value", "final"):
            item[f"{stage}_value_params_diff"] = _max_abs_diff(run[stage].value_params,
                                                               base[stage].value_params)
        item["value_update_size"] = _max_abs_diff(base["after_value"].value_params,
                                                  base["initial"].value_params)
        item["value_update_relative_diff"] = _relative_update_diff(
            run["after_value"].value_params, base["after_value"].value_params,
            base["initial"].value_params)
        item["policy_update_relative_diff"] = _relative_update_diff(
            run["final"].policy_params, base["final"].policy_params,
            base["initial"].policy_params)
        item["policy_params_diff"] = _max_abs_diff(run["final"].policy_params,
                                                   base["final"].policy_params)
        item["policy_update_size"] = _max_abs_diff(base["final"].policy_params,
                                                   base["initial"].policy_params)
        item["policy_loss_diff"] = abs(run["policy_loss"] - base["policy_loss"])
        item["steered_images_diff"] = _max_abs_diff(run["steered_images"], base["steered_images"])
        item["steered_log_weights_diff"] = _max_abs_diff(run["steered_log_weights"],
                                                         base["steered_log_weights"])
        item["steered_resampled_same"] = bool(np.array_equal(run["steered_resampled"],
                                                             base["steered_resampled"]))
        item["steered_resampled_any"] = bool(np.any(base["steered_resampled"]))
        item["policy_grad_norm_relative_diff"] = (abs(run["policy_grad_norm"]
                                                      - base["policy_grad_norm"])
                                                  / base["policy_grad_norm"])
        item["reward_mean_diff"] = float(abs(run["final"].reward_stats.mean
                                             - base["final"].reward_stats.mean))
        report["meshes"][f"{data}x{fsdp}"] = item
    report["errors"] = mesh_errors()
    out.write_text(json.dumps(report, indent=1))


def mesh_errors() -> dict:
    """The one-line errors of impossible meshes, as the trainer and validation raise them."""
    from vard_jax.config import ConfigError, validate
    from vard_jax.training.trainer import Trainer

    errors = {}
    for name, (data, fsdp, batch) in {"mesh_too_large": (4, 4, 8),
                                      "batch_not_divisible": (-1, 1, 12)}.items():
        config = tiny_config(data, fsdp, batch)
        try:
            validate(config, jax.device_count())
            Trainer(config)
            errors[name] = None
        except ConfigError as error:
            errors[name] = str(error)
    return errors


def run_process(out: pathlib.Path, workdir: pathlib.Path, port: int, process_id: int) -> None:
    from vard_jax.parallel import distributed

    config = tiny_config(data=2, fsdp=2, batch=4)  # data across the processes, fsdp within
    config.mesh.distributed = True
    config.mesh.coordinator_address = f"localhost:{port}"
    config.mesh.num_processes = 2
    config.mesh.process_id = process_id
    config.value.pretrain_epochs = 0
    config.value.batch_size = 4
    config.sample.eval_batch_size = 4
    config.train.epochs = 2
    config.train.eval_every = 2
    distributed.initialize(config)

    from vard_jax.config import validate
    from vard_jax.parallel import mesh as mesh_lib
    from vard_jax.training.loop import Loop

    validate(config, jax.device_count())
    shapes_model.UNET_CONFIG = SMALL_UNET
    began = time.time()
    loop = Loop(config, workdir)
    ids = loop.trainer.put_batch(np.arange(4 * 3).reshape(4, 3))
    rows = loop.run()
    trained = mesh_lib.to_host(loop.final_state)
    saved_steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                         if p.name.isdigit())
    # orbax writes each process's share of the arrays under ocdbt.process_<index>
    writers = sorted(p.name for p in (workdir / "checkpoints" / str(saved_steps[-1]) / "state")
                     .glob("ocdbt.process_*") if any(p.rglob("*")))

    restorer = Loop(config, workdir, trainer=loop.trainer)
    restored_state, step = restorer.restore_or_init()
    restored = mesh_lib.to_host(restored_state)
    leaves = list(zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(restored)))
    report = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "mesh": dict(loop.trainer.mesh.shape),
        "local_rows": sorted({int(row[0]) // 3 for shard in ids.addressable_shards
                              for row in np.asarray(shard.data)}),
        "steps": [r["step"] for r in rows],
        "reward_queries": int(trained.reward_queries),
        "saved_steps": saved_steps, "restored_step": int(step), "checkpoint_writers": writers,
        "restored_equal": all(np.array_equal(a, b) for a, b in leaves),
        "restored_policy_sharded": len(_sharded_leaves(restored_state.policy_params)),
        "restored_global": not any(leaf.is_fully_addressable
                                   for leaf in jax.tree_util.tree_leaves(restored_state)),
        "policy_changed": _max_abs_diff(trained.policy_params,
                                        mesh_lib.to_host(loop.trainer.initial_policy_params())),
        "seconds": time.time() - began,
    }
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    mode, out_path = sys.argv[1], pathlib.Path(sys.argv[2])
    if mode == "meshes":
        run_meshes(out_path)
    elif mode == "multiprocess":
        run_process(out_path, pathlib.Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; use meshes or multiprocess")
