"""Start-up validation: each bad value stops with one line naming the field; exit status 2."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import base, shapes
from vard_jax.config import ConfigError, mesh_shape, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def good():
    return shapes.get_config()


def test_shipped_configs_validate():
    validate(good(), device_count=1)
    validate(shapes.get_config("tiny"), device_count=1)
    validate(base.get_config(), device_count=4)



def test_validator_choices_match_the_implementations():
    """vard_jax/config.py keeps jax out of start-up validation, so it repeats the choices
    the implementations accept; the two lists must not drift apart."""
    from vard_jax import config
    from vard_jax.algorithms import ddpo
    from vard_jax.diffusion import ddim, rollout
    from vard_jax.training import epochs

    assert set(config.ALGORITHMS) == set(epochs.STAGES)
    assert set(config.REMAT_POLICIES) == set(rollout.REMAT_POLICIES)
    assert set(config.CLIP_GRADIENTS) == set(ddim.CLIP_GRADIENTS)
    assert set(config.DDPO_REDUCTIONS) == set(ddpo.REDUCTIONS)

@pytest.mark.parametrize("field, value, message", [
    ("policy.learning_rate", -1e-4, "config.policy.learning_rate = -0.0001: not allowed; must be a number > 0"),
    ("value.learning_rate", 0.0, "config.value.learning_rate = 0.0"),
    ("sample.guidance_scale", -1.0, "config.sample.guidance_scale = -1.0"),
    ("sample.eta", 1.5, "must be a number in [0, 1]"),
    ("sample.eval_eta", -0.5, "must be a number in [0, 1], or -1 for sample.eta"),
    ("sample.eval_batches", 0, "config.sample.eval_batches = 0: not allowed; must be an integer >= 1"),
    ("policy.grad_depth", 11, "config.policy.grad_depth = 11: must be in [1, sample.num_steps = 10]"),
    ("policy.grad_depth", 0, "config.policy.grad_depth = 0"),
    ("policy.train_fraction", 0.0, "config.policy.train_fraction"),
    ("algorithm", "ppo", "config.algorithm = 'ppo': not allowed; must be one of vard"),
    ("reward.name", "pixel_count", "unknown reward 'pixel_count'"),
    ("reward.name", "clip_alignment:abc", "weight 'abc'"),
    ("policy.learning_rate", float("nan"), "must be finite"),
    ("mesh.cpu_devices", -1, "config.mesh.cpu_devices = -1: not allowed; must be an integer >= 0"),
    ("train.max_nonfinite_in_a_row", 0, "config.train.max_nonfinite_in_a_row = 0: not allowed"),
    ("policy.clip_x0_gradient", "identity",
     "config.policy.clip_x0_gradient = 'identity': not allowed; must be one of exact, "
     "straight_through"),
    ("policy.kl_on", "both",
     "config.policy.kl_on = 'both': not allowed; must be one of conditional, guided"),
])
def test_impossible_values(field, value, message):
    config = good()
    section, _, key = field.rpartition(".")
    node = config[section] if section else config
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[key] = value
    with pytest.raises(ConfigError) as error:
        validate(config, device_count=1)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_unknown_key_and_wrong_type():
    config = good()
    config.train.sed = 3
    with pytest.raises(ConfigError, match=r"config.train.sed: unknown key; config.train has: epochs, eval_every, max_nonfinite_in_a_row, seed"):
        validate(config)
    config = good()
    config.extra = ml_collections.ConfigDict({"a": 1})
    with pytest.raises(ConfigError, match="config.extra: unknown section"):
        validate(config)
    raw = good().to_dict()
    raw["sample"]["num_steps"] = "ten"  # as a config file that builds its own dict could
    config = ml_collections.ConfigDict(raw)
    with pytest.raises(ConfigError, match=r"config.sample.num_steps = 'ten': expected type int, got str"):
        validate(config)
    raw = good().to_dict()
    raw["logging"]["tensorboard"] = 1
    config = ml_collections.ConfigDict(raw)
    with pytest.raises(ConfigError, match="config.logging.tensorboard = 1: expected type bool"):
        validate(config)


def test_batch_divisible_by_devices_and_mesh_size():
    config = good()  # batch 16, eval batch 32
    validate(config, device_count=8)
    with pytest.raises(ConfigError, match=r"config.sample.batch_size = 16: must be divisible by the 3 devices"):
        validate(config, device_count=3)
    config.mesh.data = 4
    config.mesh.fsdp = 2
    assert mesh_shape(config, 8) == (4, 2)
    with pytest.raises(ConfigError, match="needs 8 devices, more than the 4 available"):
        validate(config, device_count=4)
    config.mesh.data, config.mesh.fsdp = -1, 2
    assert mesh_shape(config, 8) == (4, 2)


def test_ddpo_updates_per_epoch_and_too_much_accumulation():
    from vard_jax.training import optimizers

    config = good()  # 16 chains an epoch
    config.algorithm = "ddpo"
    config.ddpo.inner_epochs = 2
    # ddpo-pytorch's layout: one step per minibatch of 4 chains (accumulated over their steps)
    assert optimizers.policy_updates_per_epoch(config, stochastic_steps=9, data_shards=1) == 2 * 4
    config.ddpo.gradient_accumulation = 3  # 4 minibatches -> 1 step of 3, one left over
    assert optimizers.policy_updates_per_epoch(config, 9, 1) == 2 * 1
    config.ddpo.accumulate_timesteps = False  # 144 transitions in micro-batches of 4
    assert optimizers.policy_updates_per_epoch(config, 9, 1) == 2 * (36 // 3)
    config.ddpo.accumulate_timesteps = True
    config.ddpo.gradient_accumulation = 5
    with pytest.raises(ConfigError, match=r"config.ddpo.gradient_accumulation = 5: an epoch holds "
                       r"fewer minibatches of 4 chains; lower it or sample more per epoch"):
        optimizers.policy_updates_per_epoch(config, 9, 1)


def test_a_config_saved_before_a_behaviour_changing_key_keeps_its_behaviour():
    """A DDPO run saved before ddpo-pytorch's settings became the defaults resumes (and
    evaluates) with its old settings, and a resumed run that would switch is named by
    Checkpointer.check_config; other algorithms get today's defaults (their runs ignore them)."""
    from vard_jax.config import with_defaults

    saved = good().to_dict()
    saved["algorithm"] = "ddpo"
    saved["ddpo"]["minibatch_size"] = 32
    for key in ("accumulate_timesteps", "gradient_accumulation", "stat_buffer",
                "stat_min_count", "learning_rate"):
        del saved["ddpo"][key]
    completed = with_defaults(saved)
    assert (completed.ddpo.accumulate_timesteps, completed.ddpo.gradient_accumulation,
            completed.ddpo.stat_buffer, completed.ddpo.stat_min_count,
            completed.ddpo.learning_rate, completed.ddpo.minibatch_size) == (False, 1, 0, 2, 0.0, 32)
    validate(completed)
    assert saved["ddpo"].get("stat_buffer") is None  # the caller's dict is left as it was
    saved["algorithm"] = "vard"
    assert with_defaults(saved).ddpo.stat_buffer == base.get_config().ddpo.stat_buffer
    # VARD and DRaFT runs saved before policy.kl_on existed kept D on the guided predictions.
    assert base.get_config().policy.kl_on == "conditional"
    del saved["policy"]["kl_on"]
    for algorithm in ("vard", "draft"):
        saved["algorithm"] = algorithm
        assert with_defaults(saved).policy.kl_on == "guided"
    saved["algorithm"] = "ddpo"  # (DDPO has no KL term)
    assert with_defaults(saved).policy.kl_on == "conditional"


def _main(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))  # config files elsewhere import configs.*
    return subprocess.run([sys.executable, "-m", "vard_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


BAD_CONFIGS = {  # config files that load but are not a complete config
    "plain.py": "def get_config():\n    return {'train': {'epochs': 1}}\n",
    "raises.py": "def get_config():\n    raise RuntimeError('no GPU here')\n",
    "no_beta.py": ("from configs import shapes\n\ndef get_config():\n"
                   "    config = shapes.get_config('tiny')\n    del config.policy['beta']\n"
                   "    return config\n"),
    "no_mesh.py": ("from configs import shapes\n\ndef get_config():\n"
                   "    config = shapes.get_config('tiny')\n    del config['mesh']\n"
                   "    return config\n"),
}


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/shapes.py", "--config.policy.learning_rate=-1", "--workdir=<W>"],
     "error: config.policy.learning_rate = -1.0: not allowed; must be a number > 0"),
    (["--config=configs/shapes.py", "--config.train.sed=3", "--workdir=<W>"],
     "error: unknown config key 'config.train.sed' (Did you mean 'seed'?): the config has no "
     "such field"),
    (["--config=configs/shapes.py", "--config.bogus=1", "--workdir=<W>"],
     "error: unknown config key 'config.bogus'"),
    (["--config=configs/missing.py", "--workdir=<W>"],
     "error: cannot load --config: [Errno 2] No such file or directory: 'configs/missing.py'"),
    (["--config=<C>/plain.py", "--workdir=<W>"],
     "error: the config is a dict, not an ml_collections.ConfigDict"),
    (["--config=<C>/raises.py", "--workdir=<W>"],
     "error: --config=<C>/raises.py: get_config() raised RuntimeError: no GPU here"),
    (["--config=<C>/no_beta.py", "--workdir=<W>"],
     "error: config.policy.beta: missing key (vard_jax/schema.py's default: 0.01)"),
    (["--config=<C>/no_mesh.py", "--workdir=<W>"], "error: config.mesh: missing section"),
    (["--config=configs/shapes.py", "--config.sample.guidance_scale=1e30", "--workdir=<W>"],
     "error: config.sample.guidance_scale = 1e+30: not allowed; must be a number in [0, 100]"),
    (["--config=configs/shapes.py", "--config.sample.eval_prompts= ", "--workdir=<W>"],
     "error: config.sample.eval_prompts = "),
    (["--config=configs/shapes.py", "--config.sample.train_prompts=<C>", "--workdir=<W>"],
     "error: config.sample.train_prompts: prompts file <C> is a directory"),
])
def test_command_line_errors_are_one_line_exit_2(args, expected, tmp_path):
    """Bad input stops before anything is written: one line, exit 2, no workdir left."""
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    for name, text in BAD_CONFIGS.items():
        (configs_dir / name).write_text(text)
    workdir = tmp_path / "runs" / "w"

    def fill(text: str) -> str:
        return text.replace("<W>", str(workdir)).replace("<C>", str(configs_dir))

    result = _main(*map(fill, args))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(fill(expected)), lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
