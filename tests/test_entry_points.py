"""Tests of the evaluation and sampling entry points (``vard_jax.evaluate``, ``vard_jax.sample``).

One tiny training run (one epoch of ``configs/shapes.py:tiny``) is shared by the module. The
command lines run as subprocesses (three in all: absl flags are process-global); the rest goes
through the modules' Python functions, in this process.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import ml_collections
import numpy as np
import pytest
from PIL import Image

import configs.base
import configs.shapes
from vard_jax import evaluate
from vard_jax.training import runs
from vard_jax.training.runs import EvaluationError, ModelSpec
from vard_jax.training.images import grid
from vard_jax.worlds import shapes as world

REPO = pathlib.Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"step", "pretrained", "workdir", "reward", "rewards", "skipped_rewards",
                "eps_distance", "num_samples", "distinct_prompts", "seed", "batch_size",
                "devices", "prompts_source", "out"}


class TrainedRun(NamedTuple):
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    rows: list[dict]  # the rows the loop wrote to metrics.jsonl (steps 0 and 1)


def tiny_config() -> ml_collections.ConfigDict:
    """``configs/shapes.py:tiny`` for one epoch, with the shipped model assets."""
    config = configs.shapes.get_config("tiny")
    config.train.epochs = 1
    config.logging.tensorboard = False
    return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One epoch of training, checkpointed at step 1 (shared by the whole module)."""
    from vard_jax.training.loop import Loop

    config = tiny_config()
    workdir = tmp_path_factory.mktemp("entry_points") / "run"
    rows = Loop(config, workdir).run()
    assert [row["step"] for row in rows] == [0, 1]
    return TrainedRun(workdir, config, rows)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, capturing its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def last_json_line(text: str) -> dict:
    """The JSON object on the last non-empty line of ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


def assert_close(actual: float, expected: float) -> None:
    """Equal up to float32 noise (the subprocess compiles the same computation again)."""
    assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6)


# --- evaluate: command line ----------------------------------------------------------------------
def test_evaluate_cli_writes_summary_matching_training_eval(trained_run: TrainedRun) -> None:
    result = run_module("vard_jax.evaluate", f"--workdir={trained_run.workdir}")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    out = trained_run.workdir / "eval_step_1.json"
    assert summary["out"] == str(out)
    assert json.loads(out.read_text()) == summary
    assert SUMMARY_KEYS <= set(summary)

    config = trained_run.config
    assert summary["step"] == 1 and summary["pretrained"] is False
    assert summary["reward"] == config.reward.name
    assert summary["num_samples"] == config.sample.eval_batch_size * config.sample.eval_batches
    assert summary["seed"] == config.train.seed
    assert summary["batch_size"] == config.sample.eval_batch_size
    assert summary["devices"] == 1  # the suite pins one device per process (tests/conftest.py)
    assert summary["prompts_source"] == config.sample.eval_prompts
    assert set(summary["rewards"]) == {"clip_alignment", "shape_fidelity"}
    assert summary["skipped_rewards"] == {}
    for stats in summary["rewards"].values():
        assert set(stats) == {"mean", "std", "min", "max"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
        assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0.0
    assert math.isfinite(summary["eps_distance"]) and summary["eps_distance"] > 0.0

    # The defaults reproduce the training loop's own evaluation of the same checkpoint.
    logged = trained_run.rows[-1]
    for name, stats in summary["rewards"].items():
        assert_close(stats["mean"], logged[f"eval_{name}_mean"])
        assert_close(stats["std"], logged[f"eval_{name}_std"])
    assert_close(summary["eps_distance"], logged["eval_eps_distance"])


def test_evaluate_cli_missing_checkpoint_is_one_line_error(tmp_path: pathlib.Path) -> None:
    result = run_module("vard_jax.evaluate", f"--workdir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "no checkpoint" in lines[0]
    assert not (tmp_path / "checkpoints").exists(), "looking must not create the directory"


@pytest.mark.parametrize("module", ["vard_jax.sample", "vard_jax.evaluate"])
def test_steering_flags_reach_the_entry_points(trained_run: TrainedRun, tmp_path: pathlib.Path,
                                               module: str) -> None:
    """The steering flags parse and arrive (a bad --select stops before a model is built)."""
    sampling = module.endswith("sample")
    out = tmp_path / ("grid.png" if sampling else "summary.json")
    result = run_module(module, f"--workdir={trained_run.workdir}", "--pretrained",
                        "--prompt=a red circle" if sampling else "--seed=1", "--particles=2",
                        "--temperature=0.5", "--select=best", f"--out={out}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--select=best: use one of" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


# --- evaluate: Python functions -------------------------------------------------------------------
def test_pretrained_evaluation_has_zero_distance(trained_run: TrainedRun) -> None:
    spec = ModelSpec(workdir=trained_run.workdir, pretrained=True)
    summary = evaluate.run_evaluation(spec)
    assert summary["step"] == 0 and summary["pretrained"] is True
    assert 0.0 <= summary["eps_distance"] < 1e-6
    assert evaluate.default_output(spec, summary) == trained_run.workdir / "eval_pretrained.json"
    # The loop's step-0 evaluation scores the same (untouched) policy.
    logged = trained_run.rows[0]
    for name, stats in summary["rewards"].items():
        assert_close(stats["mean"], logged[f"eval_{name}_mean"])


@pytest.mark.parametrize("spec_kwargs, message", [
    ({"step": 7}, "saved steps: 1"),
    ({"step": 1, "with_workdir": False}, "--workdir"),
    ({"config": True}, "--pretrained only"),
])
def test_bad_model_choice_is_reported(trained_run: TrainedRun, spec_kwargs: dict,
                                      message: str) -> None:
    kwargs = dict(spec_kwargs)
    workdir = trained_run.workdir if kwargs.pop("with_workdir", True) else None
    if kwargs.pop("config", False):
        kwargs["config"] = tiny_config()
    with pytest.raises(EvaluationError, match=message):
        evaluate.run_evaluation(ModelSpec(workdir=workdir, **kwargs))


def test_bad_prompts_files_are_reported(trained_run: TrainedRun, tmp_path: pathlib.Path) -> None:
    spec = ModelSpec(workdir=trained_run.workdir)
    missing, binary, empty = tmp_path / "missing.txt", tmp_path / "binary.txt", tmp_path / "e.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    empty.write_text("\n \n", encoding="utf-8")
    for path, message in ((missing, "does not exist"), (binary, "not UTF-8"),
                          (empty, "no prompts"), (tmp_path, "is a directory; give a text file")):
        with pytest.raises(EvaluationError, match=message):
            evaluate.run_evaluation(spec, prompts_file=str(path))
    with pytest.raises(EvaluationError, match="num_samples"):
        evaluate.run_evaluation(spec, num_samples=0)


def test_missing_workdir_is_reported(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EvaluationError, match="does not exist"):
        runs.resolve_config(ModelSpec(workdir=tmp_path / "absent"))
    with pytest.raises(EvaluationError, match="--workdir"):
        runs.resolve_config(ModelSpec())


def test_a_checkpoint_from_before_a_config_key_existed_still_loads(tmp_path: pathlib.Path):
    """A run saved by an earlier version lacks later keys: its config is completed with the
    defaults (saved values win), instead of failing on the first missing key."""
    from vard_jax.training.checkpoints import Checkpointer

    saved = tiny_config().to_dict()
    saved["train"]["seed"] = 7
    del saved["value"]["log_grad_alignment"]  # a key added after such a run was written
    del saved["mesh"]["cpu_devices"]
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", 2)
    checkpointer.save(3, {"x": np.zeros(2, np.float32)}, json.dumps(saved))
    checkpointer.wait()
    checkpointer.close()
    resolved = runs.resolve_config(ModelSpec(workdir=tmp_path / "run"))
    assert resolved.step == 3
    assert resolved.config.value.log_grad_alignment is False
    assert resolved.config.mesh.cpu_devices == configs.base.get_config().mesh.cpu_devices
    assert resolved.config.train.seed == 7
    assert resolved.config.value.arch == saved["value"]["arch"]
    from vard_jax.config import validate

    validate(resolved.config)  # complete and well-typed

    # Read as a plain file (before the backend starts), the saved config chooses the host's
    # devices as training does: 2 cores divide the tiny config's batches (4, 4, 8).
    assert runs.peek_saved_config(tmp_path / "run") == checkpointer_config(tmp_path / "run")
    assert runs.peek_saved_config(tmp_path / "run", 3) == saved
    spec = ModelSpec(workdir=tmp_path / "run")
    assert runs.planned_host_devices(spec, environ={}, cores=2) == 2
    assert runs.planned_host_devices(spec, batch_size=3, environ={}, cores=2) is None
    named = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert runs.planned_host_devices(spec, environ=named, cores=2) is None  # user's wins
    assert runs.planned_host_devices(spec, environ={"JAX_NUM_CPU_DEVICES": "1"}, cores=2) is None
    for missing in (ModelSpec(workdir=tmp_path / "none"), ModelSpec(workdir=tmp_path / "run",
                                                                    step=9)):
        assert runs.planned_host_devices(missing, environ={}, cores=2) is None


def checkpointer_config(workdir: pathlib.Path) -> dict:
    """The latest checkpoint's config as orbax restores it."""
    from vard_jax.training.checkpoints import Checkpointer

    checkpointer = Checkpointer(runs.checkpoint_dir(workdir), 2)
    try:
        return checkpointer.restore_config()
    finally:
        checkpointer.close()


def test_batch_size_must_split_over_the_data_axis() -> None:
    runs.check_batch_size(8, 4)
    with pytest.raises(EvaluationError, match="divisible by the 4 devices"):
        runs.check_batch_size(6, 4)
    with pytest.raises(EvaluationError, match=">= 1"):
        runs.check_batch_size(0, 1)


def test_shape_fidelity_is_always_scored_for_in_grammar_prompts() -> None:
    heldout = world.all_prompts("heldout")[:3]
    config = tiny_config()
    config.reward.eval_extra = ""
    assert runs.configure_eval_rewards(config, heldout) == {}
    assert config.reward.eval_extra == "shape_fidelity"
    assert runs.configure_eval_rewards(config, heldout) == {}  # idempotent
    assert config.reward.eval_extra == "shape_fidelity"

    config.reward.eval_extra = "jpeg_compressibility,shape_fidelity"
    skipped = runs.configure_eval_rewards(config, heldout + ["a photo of a cat"])
    assert set(skipped) == {"shape_fidelity"} and "a photo of a cat" in skipped["shape_fidelity"]
    assert config.reward.eval_extra == "jpeg_compressibility"
    # caption_choice reads the caption's scene too: left out with shape fidelity.
    config.reward.eval_extra = "caption_choice,jpeg_compressibility"
    skipped = runs.configure_eval_rewards(config, heldout + ["a photo of a cat"])
    assert set(skipped) == {"shape_fidelity", "caption_choice"}
    assert config.reward.eval_extra == "jpeg_compressibility"

    config.reward.name = "clip_alignment:1.0,shape_fidelity:0.5"
    config.reward.eval_extra = ""
    assert runs.configure_eval_rewards(config, heldout) == {}
    assert config.reward.eval_extra == "", "already scored as a part of the reward"

    other = configs.base.get_config()
    other.pretrained.family = "stable_diffusion"
    assert runs.configure_eval_rewards(other, heldout) == {}
    assert other.reward.eval_extra == ""


def test_prompts_file_is_cycled_in_order(trained_run: TrainedRun, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train"  # a file named like a split is still read as a file
    path.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    prompts, source = runs.evaluation_prompts(trained_run.config, str(path), 5, seed=0)
    assert prompts == ["first prompt", "second prompt"] * 2 + ["first prompt"]
    assert source == str(path.resolve())
    prompts, _ = runs.evaluation_prompts(trained_run.config, str(path), None, seed=0)
    assert prompts == ["first prompt", "second prompt"]


# --- export ---------------------------------------------------------------------------------------
def test_export_cli_writes_the_merged_unet_and_a_model_card(trained_run: TrainedRun,
                                                             tmp_path: pathlib.Path) -> None:
    """A full fine-tuning run exports its UNet in diffusers' layout (the checkpoint's policy,
    nothing else read from it), with a model card and the config; bad requests are one line."""
    from safetensors.numpy import load_file

    from vard_jax import export
    from vard_jax.models import diffusers_export
    from vard_jax.training.checkpoints import Checkpointer

    out = tmp_path / "export"
    result = run_module("vard_jax.export", f"--workdir={trained_run.workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["format"] == "merged" and summary["step"] == 1
    assert sorted(p.name for p in (out / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    checkpointer = Checkpointer(trained_run.workdir / "checkpoints", keep=3)
    policy = checkpointer.restore_field("policy_params", 1)
    checkpointer.close()
    written = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    expected = diffusers_export.torch_state_dict(policy)
    assert set(written) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DConditionModel"
    card = (out / "README.md").read_text()
    name = trained_run.config.reward.name
    first, last = trained_run.rows[0], trained_run.rows[-1]
    assert (f"| {name}, held-out prompts | {first[f'eval_{name}_mean']:.4g} | "
            f"{last[f'eval_{name}_mean']:.4g} |") in card
    assert "| algorithm | vard |" in card and "subfolder=\"unet\"" in card
    assert json.loads((out / "vard_config.json").read_text())["sample"]["num_steps"] == (
        trained_run.config.sample.num_steps)

    for kwargs, message in (
            (dict(out=tmp_path / "lora", fmt="lora"), "--format=lora: this run fine-tuned the "
             "whole network"),
            (dict(out=trained_run.workdir / "export"), "is inside the run's workdir"),
            (dict(out=out), "exists and is not an empty directory"),
            (dict(out=tmp_path / "other", step=7), "--step=7: no checkpoint of that step")):
        with pytest.raises(export.ExportError, match=message) as error:
            export.export(trained_run.workdir, **kwargs)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "lora").exists() and not (trained_run.workdir / "export").exists()


# --- sample ---------------------------------------------------------------------------------------
def test_sample_cli_writes_grid(trained_run: TrainedRun) -> None:
    prompts = world.all_prompts("heldout")[:2]
    per_prompt = 2
    out = trained_run.workdir / "grids" / "sample.png"
    result = run_module("vard_jax.sample", f"--workdir={trained_run.workdir}",
                        *(f"--prompt={p}" for p in prompts), f"--num_per_prompt={per_prompt}",
                        "--seed=3", f"--out={out}")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["path"] == str(out) and summary["step"] == 1
    expanded = [p for p in prompts for _ in range(per_prompt)]
    assert [image["prompt"] for image in summary["images"]] == expanded
    rewards = [image["reward"] for image in summary["images"]]
    assert all(math.isfinite(r) for r in rewards)

    size = world.IMAGE_SIZE
    expected = grid(np.zeros((len(expanded), size, size, 3), np.float32), expanded, rewards,
                    columns=per_prompt)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == expected.size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0.0, "the grid holds images, not a blank canvas"


def test_bad_outputs_fail_before_sampling(trained_run: TrainedRun, tmp_path: pathlib.Path,
                                          monkeypatch) -> None:
    """--out naming a directory, or a path under a regular file, fails at once with one line
    (before a model is loaded or an image sampled) and leaves nothing behind."""
    existing = tmp_path / "existing"
    existing.mkdir()
    result = run_module("vard_jax.evaluate", f"--workdir={trained_run.workdir}",
                        f"--out={existing}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert lines == [f"error: --out={existing} is a directory; give a file name"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert not any(existing.iterdir())

    from vard_jax import sample

    monkeypatch.setattr(sample, "sample_images", None)  # nothing may be sampled
    spec = ModelSpec(workdir=trained_run.workdir)
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(EvaluationError, match="grid.png is a directory; give a file name"):
        sample.run_sampling(spec, ["a red circle"], tmp_path / "grid.png")
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(EvaluationError, match="cannot write under .*a_file; choose another"):
        sample.run_sampling(spec, ["a red circle"], tmp_path / "a_file" / "grid.png")


def test_sample_warns_about_over_long_prompts(trained_run: TrainedRun, tmp_path: pathlib.Path,
                                              caplog) -> None:
    from vard_jax import sample

    long_prompt = "two blue squares on a white background " * 400  # ~16,000 characters
    with caplog.at_level("WARNING"):
        summary = sample.run_sampling(ModelSpec(workdir=trained_run.workdir),
                                      [long_prompt.strip()], tmp_path / "grid.png")
    assert summary["images"][0]["prompt"] == long_prompt.strip()
    assert ("prompt set --prompt/--prompts_file: 1 of 1 prompts are longer than the "
            "tokenizer's") in caplog.text


def test_steered_sampling_and_evaluation_with_the_runs_value(trained_run: TrainedRun,
                                                              tmp_path: pathlib.Path) -> None:
    """The run's value steers its policy or, with --pretrained, the base model."""
    from vard_jax import sample
    from vard_jax.diffusion.sampler import SteeringSpec

    prompts = world.all_prompts("heldout")[:3]
    smc = SteeringSpec(particles=2, temperature=0.5)
    summary = sample.run_sampling(ModelSpec(workdir=trained_run.workdir, pretrained=True),
                                  prompts, tmp_path / "smc.png", steering=smc, seed=5)
    assert summary["pretrained"] is True and summary["steering"]["select"] == "weight"
    assert [image["prompt"] for image in summary["images"]] == prompts
    assert all(math.isfinite(image["value"]) and math.isfinite(image["reward"])
               for image in summary["images"])
    assert (tmp_path / "smc.png").is_file()

    # best-of-2 by reward, each sample value-guided
    best = SteeringSpec(particles=2, resample_every=0, value_guidance=1.0)
    spec = ModelSpec(workdir=trained_run.workdir)
    evaluated = evaluate.run_evaluation(spec, num_samples=6, steering=best, select="reward")
    steered = evaluated["steering"]
    assert steered["unet_calls_per_image"] == 2 * 2 * trained_run.config.sample.num_steps
    assert steered["resampled_fraction"] == 0.0
    reward = evaluated["reward"]
    # The best of each prompt's two samples beats any weighting of them.
    assert evaluated["rewards"][reward]["mean"] >= steered["weighted_means"][reward] - 1e-6
    assert evaluated["eps_distance"] is None and evaluated["num_samples"] == 6
    assert (evaluate.default_output(spec, evaluated).name
            == "eval_step_1_guidance1_bestof2_reward.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"config": True}, "needs the run that trained it"),
    ({"select": "best"}, "--select=best: use one of"),
    ({"steering": {"particles": 2, "temperature": 0.0}}, "temperature = 0.0: must be > 0"),
    ({"batch_size": 3}, "multiple of 2"),
])
def test_bad_steering_is_a_one_line_error(trained_run: TrainedRun, tmp_path: pathlib.Path,
                                          kwargs: dict, message: str) -> None:
    from vard_jax import sample
    from vard_jax.diffusion.sampler import SteeringSpec

    spec = ModelSpec(workdir=trained_run.workdir)
    if kwargs.pop("config", False):
        spec = ModelSpec(config=tiny_config(), pretrained=True)
    steering = SteeringSpec(**kwargs.pop("steering", {"particles": 2}))
    with pytest.raises(EvaluationError, match=message) as error:
        sample.run_sampling(spec, ["a red circle"], tmp_path / "grid.png", steering=steering,
                            **kwargs)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "grid.png").exists()
