"""The shapes world's flow-matching model (family ``shapes_flow``, configs/shapes_flow.py): the
shipped MMDiT samples the world, and VARD, Flow-GRPO, DDPO and DRaFT train on it through the shared
loop (the flow grid, the SDE step's log-probs, the velocity KL, LoRA on both streams)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import shapes_flow
from tests.tiny_runs import UNROLL
from vard_jax.config import validate
from vard_jax.diffusion import flow, sampler as sampler_lib
from vard_jax.models import shapes as shapes_model
from vard_jax.models.pipeline import MMDiTPipeline
from vard_jax.rewards.shape_fidelity import shape_fidelity
from vard_jax.training.loop import Loop
from vard_jax.worlds import shapes as world


def test_shipped_flow_model_samples_the_world():
    pipeline, params, _, _ = shapes_model.load(flow=True)
    assert isinstance(pipeline, MMDiTPipeline)
    assert isinstance(pipeline.schedule, flow.FlowMatchConfig)
    index = json.loads((shapes_model.ASSET_DIR / "model_index.json").read_text())
    assert index["flow"]["transformer"]["num_layers"] == shapes_model.MMDIT_CONFIG["num_layers"]
    quality = index["flow"]["quality"]
    assert 0.0 <= quality["base_heldout_shape_fidelity"][0] <= 1.0
    prompts = list(np.random.default_rng(0).choice(world.all_prompts("train"), 8))
    sample = sampler_lib.jit_sampler(pipeline, sampler_lib.SamplerSpec(10, 0.0, 3.0))
    samples = sample(params, params["unet"], pipeline.tokenize(prompts), jax.random.PRNGKey(0))
    images = np.asarray(samples.images)
    assert images.shape == (8, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.isfinite(images).all() and images.std() > 0.05
    # Better than noise: scenes the gold program recognises (real images score 1.0).
    assert float(shape_fidelity(images, prompts).mean()) > 0.05


def test_flow_config_errors_are_one_line(tmp_path):
    from vard_jax.config import ConfigError

    config = shapes_flow.get_config("tiny")
    config.pretrained.resolution = 64
    with pytest.raises(ConfigError, match="only Stable Diffusion samples at another size"):
        validate(config)
    config = shapes_flow.get_config("tiny")
    config.value.arch = "unet_head"
    with pytest.raises(ValueError, match="transformer has none"):
        Loop(config, tmp_path)


def _tiny(algorithm: str):
    config = shapes_flow.get_config("tiny")
    config.algorithm = algorithm
    config.policy.scan_unroll = UNROLL
    config.train.epochs = config.train.eval_every = 1 if algorithm != "vard" else 2
    if algorithm in ("grpo", "ddpo"):
        config.reward.name = "jpeg_compressibility"
        config.policy.scan_unroll = 0
        config.ddpo.minibatch_size = 2
    if algorithm == "grpo":
        config.grpo.group_size = 2
    if algorithm == "draft":
        config.draft.beta = 0.1
        config.policy.scan_unroll = 0
    validate(config)
    return config


@pytest.mark.parametrize("algorithm", ["vard", "grpo", "ddpo", "draft"])
def test_algorithms_train_on_the_flow_model(algorithm, tmp_path):
    config = _tiny(algorithm)
    loop = Loop(config, tmp_path)
    assert isinstance(loop.trainer.schedule, flow.FlowSchedule)
    rows = loop.run()
    last = rows[-1]
    for key in ("reward_mean", "policy_loss", "policy_grad_norm", "eval_reward_mean"):
        assert np.isfinite(last[key]), key
    assert last["eval_eps_distance"] > 0.0  # the policy moved off the pretrained velocities
    if algorithm == "vard":
        assert [row["step"] for row in rows] == [0, 1, 2]
        assert np.isfinite(last["value_loss"]) and np.isfinite(last["eps_distance"])
        # The export of the flow model: diffusers' SD3Transformer2DModel layout.
        from vard_jax import export
        from vard_jax.models.nn import weights as weights_lib

        summary = export.export(tmp_path, tmp_path.parent / f"{tmp_path.name}_export")
        out = pathlib.Path(summary["out"])
        assert summary["format"] == "merged" and (out / "transformer" / "config.json").is_file()
        module, params = weights_lib.load_sd3_transformer(out / "transformer")
        assert module.config == loop.trainer.pipeline.unet.config
        np.testing.assert_array_equal(
            params["proj_out"]["kernel"],
            np.asarray(loop.final_state.policy_params["proj_out"]["kernel"], np.float32))
        card = (out / "README.md").read_text()
        assert "SD3Transformer2DModel" in card and "| sample.eval_eta | 0.0 |" in card
    if algorithm in ("grpo", "ddpo"):  # the SDE step's log-probs recomputed exactly
        assert last["first_log_ratio_max"] == 0.0 and last["first_clipfrac"] == 0.0
    if algorithm == "grpo":
        assert last["kl_to_reference"] >= 0.0


def test_evaluation_samples_with_eval_eta():
    # sample.eval_eta = 0: evaluation follows the ODE (Flow-GRPO's protocol) while training
    # rollouts keep the SDE's noise level; -1 falls back to sample.eta.
    from vard_jax.training import evaluation
    from vard_jax.training.trainer import Trainer

    config = shapes_flow.get_config("tiny")
    assert config.sample.eta == 0.7 and evaluation.eval_eta(config) == 0.0
    config.sample.eval_eta = -1.0
    assert evaluation.eval_eta(config) == 0.7
    config.sample.eval_eta = 0.0
    validate(config)
    trainer = Trainer(config)
    prompts = ["a red circle", "two blue squares"]
    params = trainer.pretrained_policy_params()
    result = evaluation.evaluate(trainer, params, prompts, 2, seed=3, scored=False)
    ids = trainer.put_ids(prompts)
    key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
    for eta, same in ((0.0, True), (0.7, False)):
        spec = sampler_lib.SamplerSpec(trainer.num_steps, eta, config.sample.guidance_scale)
        images = sampler_lib.sample(trainer.pipeline, trainer.frozen, trainer.reference_params,
                                    ids, key, spec).images
        assert np.allclose(np.asarray(images), result.images, atol=1e-5) == same, eta
    config.sample.eval_eta = 1.5
    with pytest.raises(Exception, match="eval_eta"):
        validate(config)
