"""config.algorithm = ddpo | grpo | draft: the baselines train through the shared loop and
trainer."""

import json

import jax
import numpy as np
import pytest

from configs import shapes
from vard_jax.config import ConfigError, validate
from tests.tiny_runs import UNROLL
from vard_jax.training.loop import Loop


def _config(algorithm: str, reward: str):
    config = shapes.get_config("tiny")
    config.algorithm = algorithm
    config.reward.name = reward
    config.reward.eval_extra = ""
    config.sample.num_steps = 2
    config.train.epochs = 1
    config.train.eval_every = 1
    config.policy.learning_rate = 1e-3
    config.policy.lr_schedule = "cosine"  # (the tiny configs' rate is constant)
    config.policy.scan_unroll = UNROLL
    validate(config)
    return config


def _moved(a, b) -> bool:
    return any(bool(np.any(np.asarray(x) != np.asarray(y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("algorithm,reward", [("ddpo", "jpeg_compressibility"),
                                              ("draft", "clip_alignment")])
def test_baseline_trains_one_epoch(algorithm, reward, tmp_path):
    """One epoch of each baseline through the shared loop. DDPO runs in bfloat16 with LoRA, the
    hardest case for its first optimiser step: it trains at the sampling parameters, and the
    old log-probs of all its accumulated micro-batches are the update's own computation, so
    every ratio is exactly 1 and nothing is clipped, on any machine (checked exactly: the
    rollout's own log-probs differ by rounding, ``rollout_log_prob_gap``). DRaFT runs as
    AlignProp with a KL term (DRaFT+): its depth drawn inside the update (CPU's unrolled form;
    the looped form is tested against it in test_baselines)."""
    config = _config(algorithm, reward)
    if algorithm == "draft":
        config.draft.random_depth = True
        config.draft.beta = 0.1
        # CPU's default, the unrolled form (the looped one, tested in test_baselines, runs
        # its UNet backward passes in a loop body: slow on CPU)
        config.policy.scan_unroll = 0
    if algorithm == "ddpo":
        config.pretrained.dtype = config.pretrained.param_dtype = "bfloat16"
        config.policy.lora_rank = 2
        config.policy.scan_unroll = 0  # CPU's default: the micro-batch scans fully unrolled
        # (DDPO's mean log-density: with the summed one the second PPO step's loss here is not
        # finite in bfloat16, and the step is skipped)
        assert config.ddpo.reduce == "mean" and config.ddpo.clip_range == 1e-4
        # 4 chains: minibatches of one chain, two of them (every step of each) an optimiser
        # step -> two PPO steps, each accumulated over 2 x (stochastic steps) micro-batches.
        config.ddpo.minibatch_size = 1
        config.ddpo.gradient_accumulation = 2
        validate(config)
    loop = Loop(config, tmp_path)
    start = loop.trainer.pretrained_policy_params()
    rows = loop.run()
    assert [row["step"] for row in rows] == [0, 1]
    last = rows[-1]
    for key in ("reward_mean", "policy_loss", "policy_grad_norm", "eval_reward_mean",
                "eval_eps_distance", "wall_s"):
        assert np.isfinite(last[key]), key
    assert last["reward_queries"] == config.sample.batch_size  # no value pre-training
    # The learning-rate schedule spans the optimiser steps the stage really makes (a cosine
    # schedule sized for one step a batch froze DDPO after its first few PPO steps).
    assert int(loop.final_state.policy_updates) == (
        config.train.epochs * loop.trainer.policy_updates_per_epoch)
    if algorithm == "ddpo":
        assert loop.trainer.policy_updates_per_epoch == 2 > config.sample.batches_per_epoch
    # The logged rate is that of the run's last update, n - 1 of a cosine over n updates.
    n = int(loop.final_state.policy_updates)
    assert config.policy.lr_schedule == "cosine" and config.policy.warmup_steps == 0
    peak = config.ddpo.learning_rate if algorithm == "ddpo" else config.policy.learning_rate
    np.testing.assert_allclose(last["policy_learning_rate"], peak * 0.5 * (
        1 + np.cos(np.pi * (n - 1) / n)), rtol=1e-5)
    assert _moved(loop.final_state.policy_params, start)
    if algorithm == "draft":
        assert last["grad_depth"] in (1, 2) and last["eps_distance"] >= 0
    assert last["eval_eps_distance"] > 0.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    if algorithm == "ddpo":
        assert "clipfrac" in last and "approx_kl" in last
        assert last["first_log_ratio_max"] == 0.0 and last["first_clipfrac"] == 0.0
        assert np.isfinite(last["rollout_log_prob_gap"])
        # The per-prompt reward buffers are saved with the checkpoint and restored with it.
        buffers = loop.stage.steps.tracker.state_dict()
        assert sum(len(v) for v in buffers.values()) == config.sample.batch_size
        resumed = Loop(config, tmp_path, trainer=loop.trainer)
        assert resumed.stage.steps.tracker.state_dict() == {}
        resumed.restore_or_init()
        assert resumed.stage.steps.tracker.state_dict() == buffers
    else:
        assert last["grad_depth"] == config.draft.grad_depth


def test_ddpo_first_step_ratio_is_exactly_one_in_float32(tmp_path):
    """The ratio check of test_baseline_trains_one_epoch (bfloat16, LoRA) with full fine-tuning
    in float32 and the summed log-density, one epoch of the stage alone (no evaluation)."""
    config = _config("ddpo", "jpeg_compressibility")
    config.ddpo.reduce = "sum"
    config.ddpo.minibatch_size = 2  # 4 chains: two optimiser steps, each over every step
    config.policy.scan_unroll = 0  # CPU's default: the micro-batch scans unrolled (faster here)
    validate(config)
    loop = Loop(config, tmp_path)
    state, metrics = loop.stage.epoch(loop.trainer.init_state(), 0, jax.random.PRNGKey(0))
    assert int(state.policy_updates) == 2 and int(state.nonfinite_skips) == 0
    assert metrics["first_log_ratio_max"] == 0.0 and metrics["first_clipfrac"] == 0.0
    assert np.isfinite(metrics["rollout_log_prob_gap"]) and metrics["approx_kl"] >= 0.0


def test_grpo_epoch_groups_prompts_and_trains_the_first_steps(tmp_path):
    """Flow-GRPO's epoch: each prompt sampled group_size times in a batch, advantages within
    the groups, the KL to the reference logged, ratio 1 at the first step, and the first
    floor(train_fraction * steps) stochastic steps trained."""
    config = _config("grpo", "jpeg_compressibility")
    config.sample.num_steps = 4
    config.grpo.group_size = 2
    # The shapes DDIM grid's last step is deterministic: 3 stochastic steps, floor(0.7 * 3) = 2
    config.grpo.train_fraction = 0.7
    config.ddpo.minibatch_size = 2
    config.policy.scan_unroll = 0
    validate(config)
    loop = Loop(config, tmp_path)
    assert list(loop.trainer.ddpo_steps) == [0, 1]
    prompts = loop.stage.draw_prompts(0, 0)
    assert len(prompts) == config.sample.batch_size
    assert prompts[0::2] == prompts[1::2]  # groups of 2 consecutive samples
    state, metrics = loop.stage.epoch(loop.trainer.init_state(), 0, jax.random.PRNGKey(0))
    assert int(state.policy_updates) == 2 and int(state.nonfinite_skips) == 0
    assert metrics["first_log_ratio_max"] == 0.0 and metrics["first_clipfrac"] == 0.0
    assert np.isfinite(metrics["kl_to_reference"]) and metrics["kl_to_reference"] >= 0.0
    assert loop.stage.host_state() == {}
    config.grpo.group_size = 3
    with pytest.raises(ConfigError, match="must divide sample.batch_size = 4"):
        validate(config)


def test_baseline_config_errors(tmp_path):
    config = shapes.get_config("tiny")
    config.algorithm = "ddpo"
    config.sample.eta = 0.0
    with pytest.raises(ConfigError, match="ddpo needs eta > 0"):
        validate(config)
    config = _config("draft", "jpeg_compressibility")
    with pytest.raises(ValueError) as error:
        Loop(config, tmp_path)
    assert "\n" not in str(error.value) and "differentiable" in str(error.value)


@pytest.mark.slow
def test_compare_smoke(tmp_path):
    """experiments/compare.py end to end in its smoke form (three short runs)."""
    from experiments import compare

    results = compare.main([f"--out={tmp_path}", "--smoke"])
    runs = results["runs"]
    assert {r["method"] for r in runs} == {"vard", "ddpo", "draft"}
    assert all(r["returncode"] == 0 for r in runs), [r.get("error") for r in runs]
    summary = results["summary"]["clip_alignment"]
    assert set(summary["methods"]) == {"vard", "ddpo", "draft"}
    assert len(summary["vard_queries_to_ddpo_final_over_ddpo_queries"]) == 1
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "clip_alignment_vs_queries.png").is_file()
    again = compare.main([f"--out={tmp_path}", "--smoke"])  # finished runs are read back
    assert all(r["reused"] for r in again["runs"])
    assert again["summary"] == results["summary"]


def test_compare_reads_finished_runs_and_reruns_unfinished_ones(tmp_path, monkeypatch):
    """An interrupted comparison continues: finished runs are read from their metrics."""
    import json
    import subprocess

    from experiments import compare

    args = compare.parse_args([f"--out={tmp_path}", "--smoke"])
    epochs = compare.run_epochs("ddpo", args.budget, args.smoke)[0]
    workdir = tmp_path / "runs" / "clip_alignment-ddpo-seed0"
    workdir.mkdir(parents=True)
    rows = [{"step": s, "reward_queries": 4 * s, "wall_s": 10.0 * s, "eval_reward_mean": 1.0 * s,
             "eval_eps_distance": 0.1 * s} for s in range(epochs + 1)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def fake_run(command, env):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Traceback\nValueError: boom")

    monkeypatch.setattr(compare, "run_command", fake_run)
    record = compare.run_one(tmp_path, "clip_alignment", "ddpo", 0, args)
    assert not calls and record["reused"] and record["returncode"] == 0
    assert record["seconds"] == 10.0 * epochs  # no run.json: the metrics' final wall_s
    assert record["final_eval_reward"] == epochs and len(record["curve"]) == epochs + 1
    assert [p["gain"] for p in record["curve"]] == [1.0 * s for s in range(epochs + 1)]
    summary = compare.summarise([record])["clip_alignment"]["methods"]["ddpo"]
    assert summary["final_gain_mean"] == epochs and summary["final_gain_std"] == 0.0
    (workdir / "run.json").write_text(json.dumps({"seconds": 12.5}))
    assert compare.run_one(tmp_path, "clip_alignment", "ddpo", 0, args)["seconds"] == 12.5

    # The last row is not the final epoch: the run is started (and its failure reported).
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    record = compare.run_one(tmp_path, "clip_alignment", "ddpo", 0, args)
    assert len(calls) == 1 and "reused" not in record
    assert record["returncode"] == 1 and record["error"] == "ValueError: boom"


def record(method, seed, points, reward="clip_alignment"):
    """A finished run's record as compare.run_one makes it, from (queries, reward, distance)."""
    curve = [{"reward_queries": q, "eval_reward": r, "eps_distance": d, "wall_s": q,
              "gain": r - points[0][1]} for q, r, d in points]
    return {"reward": reward, "method": method, "seed": seed, "returncode": 0,
            "seconds": 1.0, "curve": curve, "final_eval_reward": curve[-1]["eval_reward"],
            "final_eps_distance": curve[-1]["eps_distance"],
            "reward_queries": curve[-1]["reward_queries"]}


def test_compare_targets_from_curves():
    """summarise's two targets on hand-made curves: VARD's queries to DDPO's final reward and
    the eps distances at the lower final reward, each flagged when its level is not above the
    start."""
    from experiments import compare

    records = [
        record("vard", 0, [(16, 0.0, 0.0), (32, 1.0, 0.1), (48, 3.0, 0.3)]),
        record("ddpo", 0, [(0, 0.0, 0.0), (64, 0.5, 0.05)]),
        record("draft", 0, [(0, 0.0, 0.0), (48, 2.0, 0.4)]),
        record("vard", 1, [(16, 0.0, 0.0), (48, 1.0, 0.2)]),
        record("ddpo", 1, [(0, 0.0, 0.0), (64, -0.5, 0.05)]),  # below its start
        record("draft", 1, [(0, 0.0, 0.0), (48, -1.0, 0.1)]),  # below its start
    ]
    entry = compare.summarise(records)["clip_alignment"]
    # 32 of 64; seed 1's DDPO final is below its start: "reached" at VARD's first evaluation
    assert entry["vard_queries_to_ddpo_final_over_ddpo_queries"] == [0.5, 0.25]
    assert entry["ddpo_final_above_start"] == [True, False]
    first, second = entry["eps_distance_at_equal_reward"]
    assert first["reward_level"] == 2.0 and first["above_start"]
    assert first["vard_eps_distance"] == pytest.approx(0.2)  # halfway from 1.0 to 3.0
    assert first["draft_eps_distance"] == pytest.approx(0.4)
    assert second["reward_level"] == -1.0 and not second["above_start"]
    assert second["vard_eps_distance"] == 0.0  # "reached" at the start


def test_compare_combines_earlier_comparisons_without_running(tmp_path, monkeypatch):
    import json

    from experiments import compare

    monkeypatch.setattr(compare, "run_command", None)  # nothing may be run
    seed0 = [record("vard", 0, [(16, 0.0, 0.0), (64, 1.0, 0.1)]),
             record("ddpo", 0, [(0, 0.0, 0.0), (64, 0.5, 0.05)])]
    seed1 = [record("vard", 1, [(16, 0.2, 0.0), (64, 0.4, 0.1)]),
             record("ddpo", 1, [(0, 0.2, 0.0), (64, 0.6, 0.05)]),
             record("vard", 0, [(16, 0.0, 0.0), (64, 1.0, 0.1)], reward="shape_fidelity")]

    def write(name, records, budget=64):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "results.json").write_text(json.dumps({"budget": budget,
                                                            "runs": records}))
        return str(directory)

    a, b = write("a", seed0), write("b", seed1 + seed0[:1])  # seed 0's VARD run in both
    results = compare.main([f"--out={tmp_path / 'all'}", f"--combine={a},{b}",
                            "--rewards=clip_alignment"])
    assert results["seeds"] == [0, 1] and results["budget"] == 64
    assert results["combined_from"] == [a, b]
    assert sorted((r["method"], r["seed"]) for r in results["runs"]) == [
        ("ddpo", 0), ("ddpo", 1), ("vard", 0), ("vard", 1)]
    assert list(results["summary"]) == ["clip_alignment"]
    assert results["summary"]["clip_alignment"]["methods"]["vard"]["seeds"] == [0, 1]
    assert json.loads((tmp_path / "all" / "results.json").read_text()) == results
    # --seeds selects among the runs found.
    only = compare.main([f"--out={tmp_path / 'one'}", f"--combine={a},{b}", "--seeds=1",
                         "--rewards=clip_alignment"])
    assert only["seeds"] == [1] and len(only["runs"]) == 2
    # --methods too.
    ddpo = compare.main([f"--out={tmp_path / 'ddpo'}", f"--combine={a},{b}", "--methods=ddpo",
                         "--rewards=clip_alignment"])
    assert sorted((r["method"], r["seed"]) for r in ddpo["runs"]) == [("ddpo", 0), ("ddpo", 1)]

    changed = write("c", [record("vard", 0, [(16, 0.0, 0.0), (64, 2.0, 0.1)])])
    other_budget = write("d", seed1, budget=128)
    before = (tmp_path / "a" / "results.json").read_text()
    for argv, message in (
            ([f"--combine={a},{changed}"], "clip_alignment-vard-0 differs between"),
            ([f"--combine={a},{other_budget}"], "budgets differ"),
            ([f"--combine={a},{tmp_path / 'none'}"], "results.json not found"),
            ([f"--combine={a}", "--seeds=5"], "no finished run of seeds [5]"),
            ([f"--combine={a}", "--methods=draft"], "and methods ['draft']"),
            ([f"--combine={a}", "--variant=x=vard:--config.a=1"], "--combine runs nothing"),
            ([f"--combine={a},{b}", f"--out={a}"], "is one of the inputs")):
        argv = [f"--out={tmp_path / 'x'}"] + argv
        with pytest.raises(SystemExit) as error:
            compare.main(argv)
        assert message in str(error.value) and "\n" not in str(error.value), error.value
    assert (tmp_path / "a" / "results.json").read_text() == before  # an input is never written


def test_compare_variants_run_under_their_own_names(tmp_path, monkeypatch):
    """--variant: a method with overrides, planned on the rewards its method applies to, run
    with the overrides under its own name, summarised with VARD's targets; bad input is one
    line."""
    import json
    import subprocess

    from experiments import compare

    replay = "vard_replay4=vard:--config.value.replay_epochs=4 --config.value.lr=3e-4"
    args = compare.parse_args([f"--out={tmp_path}", "--smoke", f"--variant={replay}",
                               "--variant=draft_k2=draft:--config.draft.grad_depth=2"])
    assert args.variants[0] == compare.Variant(
        "vard_replay4", "vard", ("--config.value.replay_epochs=4", "--config.value.lr=3e-4"))
    assert [v.name for v in compare.planned_runs("clip_alignment", args)] == [
        "vard", "ddpo", "draft", "vard_replay4", "draft_k2"]
    assert [v.name for v in compare.planned_runs("shape_fidelity", args)] == [
        "vard", "ddpo", "vard_replay4"]  # DRaFT and its variant need a differentiable reward
    args.methods = ["ddpo", "vard_replay4"]
    assert [v.name for v in compare.planned_runs("clip_alignment", args)] == [
        "ddpo", "vard_replay4"]

    calls = []

    def fake_run(command, env):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ValueError: boom")

    monkeypatch.setattr(compare, "run_command", fake_run)
    made = compare.run_one(tmp_path, "clip_alignment", "vard", 0, args, args.variants[0])
    assert made["method"] == "vard_replay4" and made["base_method"] == "vard"
    assert made["overrides"] == list(args.variants[0].overrides)
    command = calls[-1]
    assert f"--workdir={tmp_path / 'runs' / 'clip_alignment-vard_replay4-seed0'}" in command
    assert "--config.algorithm=vard" in command
    assert command[-2:] == ["--config.value.replay_epochs=4", "--config.value.lr=3e-4"]

    # A finished run made with other settings is refused, not reused under this name.
    epochs = compare.run_epochs("vard", args.budget, args.smoke)[0]
    workdir = tmp_path / "runs" / "clip_alignment-vard_replay4-seed0"
    workdir.mkdir(parents=True)
    rows = [{"step": s, "reward_queries": 4 * s, "wall_s": s, "eval_reward_mean": 1.0 * s,
             "eval_eps_distance": 0.1 * s} for s in range(epochs + 1)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "run.json").write_text(json.dumps({"seconds": 3.0, "settings": ["--x"]}))
    with pytest.raises(SystemExit) as error:
        compare.run_one(tmp_path, "clip_alignment", "vard", 0, args, args.variants[0])
    assert "not as this comparison would run it" in str(error.value)
    assert "\n" not in str(error.value)
    settings = command[command.index("--config=configs/shapes.py:tiny"):]
    (workdir / "run.json").write_text(json.dumps({"seconds": 3.0, "settings": settings}))
    calls.clear()
    reused = compare.run_one(tmp_path, "clip_alignment", "vard", 0, args, args.variants[0])
    assert not calls and reused["reused"] and reused["seconds"] == 3.0

    records = [record("vard", 0, [(16, 0.0, 0.0), (64, 0.2, 0.1)]),
               record("vard_replay4", 0, [(16, 0.0, 0.0), (32, 0.6, 0.1), (64, 0.9, 0.2)]),
               record("ddpo", 0, [(0, 0.0, 0.0), (64, 0.5, 0.05)])]
    records[1]["base_method"] = "vard"
    entry = compare.summarise(records)["clip_alignment"]
    assert set(entry["methods"]) == {"vard", "vard_replay4", "ddpo"}
    assert entry["vard_queries_to_ddpo_final_over_ddpo_queries"] == [None]  # never reached
    assert entry["variants"]["vard_replay4"] == {
        "vard_queries_to_ddpo_final_over_ddpo_queries": [0.5], "ddpo_final_above_start": [True]}

    for argv, message in (
            (["--variant=Replay=vard:--config.value.replay_epochs=4"], "lower-case NAME"),
            (["--variant=vard=vard:--config.value.replay_epochs=4"], "a method's own name"),
            (["--variant=x=ppo:--config.value.replay_epochs=4"], "unknown method 'ppo'"),
            (["--variant=x=vard:"], "no overrides"),
            (["--variant=x=vard:value.replay_epochs=4"], "is not --config.KEY=VALUE"),
            (["--variant=x=vard:--config.train.epochs=99"], "train.epochs is fixed"),
            (["--variant=x=vard:--config.a=1", "--variant=x=ddpo:--config.b=2"],
             "a name is given twice"),
            (["--methods=vard,ppo"], "--methods: unknown ['ppo']"),
            (["--variant=x=draft:--config.draft.grad_depth=2", "--rewards=shape_fidelity"],
             "draft applies to none of the rewards"),
            (["--methods=draft", "--rewards=shape_fidelity"], "nothing to run")):
        with pytest.raises(SystemExit) as error:
            compare.main([f"--out={tmp_path / 'bad'}", "--budget=8"] + argv)
        assert message in str(error.value) and "\n" not in str(error.value), error.value
    assert not (tmp_path / "bad").exists()  # refused input leaves no output directory


def test_compare_flow_comparisons_run_grpo_and_train_the_underlying_reward(tmp_path):
    """The flow_* comparisons: the flow model's configs, Flow-GRPO as the policy-gradient
    baseline (its sample-efficiency target under its own name), the reward they train."""
    from experiments import compare

    args = compare.parse_args([f"--out={tmp_path}", "--smoke",
                               "--rewards=flow_clip_alignment"])
    assert args.rewards == "flow_clip_alignment"
    assert [v.name for v in compare.planned_runs("flow_clip_alignment", args)] == [
        "vard", "grpo", "draft"]
    overrides = compare.run_overrides("flow_clip_alignment", "grpo", 0, 8, 1, True)
    assert "--config.reward.name=clip_alignment" in overrides
    assert "--config.algorithm=grpo" in overrides
    assert compare.MATRIX["flow_jpeg_compressibility"].config.endswith(
        "shapes_flow_compressibility.py")
    runs = [record("vard", 0, [(0, 0.0, 0.0), (8, 1.0, 0.1), (16, 2.0, 0.2)]),
            record("grpo", 0, [(0, 0.0, 0.0), (16, 1.0, 0.05)])]
    targets = compare._targets(runs, "vard")
    assert targets["vard_queries_to_grpo_final_over_grpo_queries"] == [0.5]
    assert targets["grpo_final_above_start"] == [True]
    assert compare.parse_args([f"--out={tmp_path}"]).rewards == ",".join(
        compare.DEFAULT_REWARDS)
