"""The training program end to end on the shipped tiny model (the session's compiled trainer,
``tests/tiny_runs.py``).

Uses the non-differentiable ``shape_fidelity`` reward, so the same trainer also shows that the
policy update never calls a host reward.
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from tests import log_files
from tests.tiny_runs import fidelity_config
from vard_jax.rewards import host_rewards
from vard_jax.training.loop import Loop
from vard_jax.training.trainer import Trainer


class CountingFidelity:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        assert isinstance(images, np.ndarray), "a host reward must only ever see numpy arrays"
        return self.fn(images, prompts)


@pytest.fixture(scope="module")
def counting_reward():
    counter = CountingFidelity(host_rewards._shape_fidelity)
    original = host_rewards._shape_fidelity
    host_rewards._shape_fidelity = counter
    yield counter
    host_rewards._shape_fidelity = original


@pytest.fixture(scope="module")
def config():
    cfg = fidelity_config()
    # The value also trains on the previous epoch's states: the resume test below then shows
    # that the replayed states are checkpointed (the Loop reads this; the trainer does not).
    cfg.value.replay_epochs = 2
    return cfg


@pytest.fixture(scope="module")
def trainer(fidelity_trainer, counting_reward):
    # The trainer is shared with other modules of this worker (test_steering samples other
    # shapes): the compile counts asserted below are this module's own.
    fidelity_trainer.policy_step.clear_cache()
    fidelity_trainer.sample.clear_cache()
    return fidelity_trainer


def test_policy_update_never_calls_the_host_reward(trainer, counting_reward):
    state = trainer.init_state()
    before = counting_reward.calls
    prompts = ["a red circle on a white background"] * trainer.config.sample.batch_size
    state, metrics = trainer.policy_update(state, prompts, jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    assert counting_reward.calls == before
    assert np.isfinite(float(metrics["policy_loss"]))
    assert float(metrics["policy_grad_norm"]) >= 0.0
    # The value stage is where it is called.
    rollout = trainer.rollout_batch(state.policy_params, prompts, jax.random.PRNGKey(1))
    trainer.reward_evaluator(np.asarray(rollout.images), prompts)
    assert counting_reward.calls == before + 1


def test_only_the_differentiated_rollout_takes_the_straight_through_clip(trainer, config):
    # Sampling, evaluation and DDPO's densities keep the exact clip; VARD's policy step and
    # DRaFT differentiate with the configured derivative (the shapes world clips x0).
    assert config.policy.clip_x0_gradient == "exact"
    assert trainer.policy_schedule.clip_gradient == "exact"
    straight = config.copy_and_resolve_references()
    straight.policy.clip_x0_gradient = "straight_through"
    other = Trainer(straight)
    assert other.schedule.clip_sample and other.policy_schedule.clip_sample
    assert other.schedule.clip_gradient == "exact"
    assert other.policy_schedule.clip_gradient == "straight_through"
    np.testing.assert_array_equal(other.policy_schedule.timesteps, other.schedule.timesteps)


def test_options_for_differentiable_rewards_are_refused_with_one_line(config):
    for section, name in (("reward", "direct_last_step"), ("value", "log_grad_alignment")):
        other = config.copy_and_resolve_references()
        other[section][name] = True
        with pytest.raises(ValueError) as error:
            Trainer(other)
        assert str(error.value) == (f"{section}.{name} needs a differentiable reward; "
                                    f"'shape_fidelity' is not (set {section}.{name}=False)")


def test_replayed_epochs_are_one_dataset_with_targets_in_todays_units():
    from vard_jax.training.state import RewardStats

    def epoch(rewards, steps=3):
        n = len(rewards)
        return {"states": np.arange(n * steps, dtype=np.float32)[:, None],
                "timesteps": np.tile(np.arange(steps), n), "step_index": np.tile(np.arange(steps), n),
                "chain": np.repeat(np.arange(n), steps), "context": np.arange(n)[:, None] * 10.0,
                "targets": np.zeros(n * steps, np.float32),
                "rewards": np.repeat(np.asarray(rewards, np.float32), steps)}

    stats = RewardStats(mean=np.float32(1.0), var=np.float32(4.0), count=np.float32(3.0))
    merged = Trainer.replay_dataset([epoch([1.0, 5.0]), epoch([-1.0])], stats)
    assert merged["states"].shape == (9, 1) and merged["context"].shape == (3, 1)
    # Each state keeps pointing at its own chain's context.
    np.testing.assert_array_equal(merged["chain"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(merged["context"][merged["chain"]][:, 0],
                                  [0, 0, 0, 10, 10, 10, 0, 0, 0])
    np.testing.assert_allclose(merged["targets"], np.repeat([0.0, 2.0, -1.0], 3), atol=1e-3)


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_logged(workdir, rows, config):
    """TensorBoard and the offline W&B run hold the rows' scalars, the evaluation grids and
    the reward histograms; returns the W&B run's id."""
    steps = [row["step"] for row in rows]
    logged = log_files.tensorboard_values(workdir / "tensorboard")
    assert sorted(logged["eval_reward_mean"]) == steps
    for row in rows:
        assert logged["eval_reward_mean"][row["step"]] == pytest.approx(row["eval_reward_mean"])
        grid = np.asarray(Image.open(workdir / "samples" / f"step_{row['step']:05d}.png"))
        np.testing.assert_array_equal(logged["samples"][row["step"]], grid)
        histogram = logged["eval_shape_fidelity"][row["step"]]
        assert histogram.num == config.sample.eval_batch_size * config.sample.eval_batches
    trained = logged["train_reward"]
    assert sorted(trained) == steps[1:] if steps[0] == 0 else steps
    assert all(h.num == config.sample.batch_size * config.sample.batches_per_epoch
               for h in trained.values())
    run_id = (workdir / "wandb_run_id").read_text().strip()
    run_files = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"))
    assert run_files, f"no offline W&B run file of run {run_id} under {workdir / 'wandb'}"
    history = [row for path in run_files for row in log_files.wandb_history(path)]
    by_step = {}
    for row in history:
        by_step.setdefault(int(row["_step"]), {}).update(row)
    for row in rows:
        assert float(by_step[row["step"]]["eval_reward_mean"]) == pytest.approx(
            row["eval_reward_mean"])
        assert json.loads(by_step[row["step"]]["samples/_type"]) == "image-file"
        assert json.loads(by_step[row["step"]]["eval_shape_fidelity/_type"]) == "histogram"
    images = list((workdir / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/*.png"))
    assert len(images) >= len(rows)
    # The run's config is the W&B run's config.
    logged_config = {}
    for path in (workdir / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"):
        for record in log_files.wandb_records(path):
            kind = record.WhichOneof("record_type")
            update = (record.run.config.update if kind == "run" else
                      record.config.update if kind == "config" else [])
            logged_config.update({item.key: json.loads(item.value_json) for item in update})
    assert logged_config["policy"]["learning_rate"] == config.policy.learning_rate
    assert logged_config["reward"]["name"] == config.reward.name
    return run_id


def test_run_writes_everything_and_resume_matches_uninterrupted(trainer, config, tmp_path,
                                                                 monkeypatch):
    # Every logger: TensorBoard (on by default) and W&B, offline (no network).
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = config.copy_and_resolve_references()
    config.logging.wandb = True
    straight = Loop(config, tmp_path / "straight", trainer=trainer)
    rows = straight.run()
    _check_logged(tmp_path / "straight", rows, config)
    assert [r["step"] for r in rows] == [0, 1, 2]
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    for key in ("step", "reward_mean", "reward_std", "eval_reward_mean", "value_loss",
                "value_explained_variance", "eps_distance", "policy_grad_norm",
                "reward_queries", "wall_s", "eval_diversity", "eval_eps_distance",
                "eval_shape_fidelity_mean"):
        assert key in lines[-1], key
    assert lines[0]["eval_eps_distance"] == 0.0 and lines[-1]["eval_eps_distance"] > 0.0
    assert all(r["eval_diversity"] > 0.0 for r in lines)
    batch = config.sample.batch_size * config.sample.batches_per_epoch
    assert lines[-1]["reward_queries"] == batch * (config.value.pretrain_epochs + 2)
    # Both optimisers' rates of the epoch's last update (the value's is constant here).
    assert config.value.warmup_steps == 0
    np.testing.assert_allclose(lines[-1]["value_learning_rate"], config.value.learning_rate,
                               rtol=1e-6)
    assert 0.0 < lines[-1]["policy_learning_rate"] <= config.policy.learning_rate
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == [
        "compare_final.png", "step_00000.png", "step_00001.png", "step_00002.png"]
    assert list((tmp_path / "straight" / "tensorboard").iterdir())
    assert straight.checkpointer.latest_step() == 2
    # The value's replay: the states of the epoch before the last, saved with the checkpoint.
    assert len(straight.stage.replay()) == 1
    saved = straight.checkpointer.restore_replay(2)
    assert len(saved) == 1
    for key, value in straight.stage.replay()[0].items():
        np.testing.assert_array_equal(saved[0][key], value)

    interrupted = Loop(config, tmp_path / "resumed", trainer=trainer)
    interrupted.run(until=1)
    assert interrupted.checkpointer.latest_step() == 1
    first_id = (tmp_path / "resumed" / "wandb_run_id").read_text().strip()
    resumed = Loop(config, tmp_path / "resumed", trainer=trainer)
    state, step = resumed.restore_or_init()
    assert step == 1
    resumed_rows = resumed.run()
    assert [r["step"] for r in resumed_rows] == [2]
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    # The resumed run continues the interrupted one's W&B run: one id, all steps.
    assert _check_logged(tmp_path / "resumed", lines, config) == first_id
    _leaves_equal(resumed.final_state.policy_params, straight.final_state.policy_params)
    _leaves_equal(resumed.final_state.value_params, straight.final_state.value_params)
    _leaves_equal(resumed.final_state.key, straight.final_state.key)
    assert int(resumed.final_state.reward_queries) == int(straight.final_state.reward_queries)
    assert lines[-1]["reward_mean"] == pytest.approx(rows[-1]["reward_mean"])
    # The resumed run samples the base model again for its comparison picture (the straight
    # run kept its step-0 evaluation): same prompts, noise and weights, the same picture.
    assert resumed.base_evaluation is not None
    compare = "samples/compare_final.png"
    assert (tmp_path / "resumed" / compare).read_bytes() == (tmp_path / "straight" /
                                                           compare).read_bytes()
    # One compiled policy step and one sampler for every call above, the first test's (keys
    # from jax.random.PRNGKey on the default device) and the loops' (split from the state's).
    assert trainer.policy_step._cache_size() == 1
    assert trainer.sample._cache_size() == 1


def test_diversity_is_the_mean_pairwise_rms_distance_within_each_prompt():
    from vard_jax.training import evaluation

    assert evaluation.diversity_prompts(["a", "a", "b", "c"], 4, 2) == ["a", "a", "b", "b"]
    assert evaluation.diversity_prompts(["a", "b"], 8, 4) == ["a"] * 4 + ["b"] * 4
    same, apart = np.full((2, 4, 4, 3), 0.3), np.stack([np.zeros((4, 4, 3)), np.ones((4, 4, 3))])
    assert evaluation.diversity(np.concatenate([same, apart]), 2) == pytest.approx(0.5)
    three = np.stack([np.zeros((2, 2, 3)), np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.6)])
    assert evaluation.diversity(three, 3) == pytest.approx((0.0 + 0.6 + 0.6) / 3)
