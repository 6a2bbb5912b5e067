"""The shipped embedded model: files, size, loading with orbax, sampling, the CLIP reward."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vard_jax.diffusion import sampler as sampler_lib
from vard_jax.models import shapes as shapes_model
from vard_jax.rewards import registry
from vard_jax.worlds import shapes as world


@pytest.fixture(scope="module")
def loaded():
    return shapes_model.load()


@pytest.fixture(scope="module")
def reward_init_trainer():
    """A Trainer of the tiny demo config with value.arch = reward_init (built once)."""
    from configs import shapes
    from vard_jax.training.trainer import Trainer

    config = shapes.get_config("tiny")
    config.value.arch = "reward_init"
    config.sample.num_steps = 4  # a state in each timestep quartile
    return Trainer(config)


def test_assets_are_complete_and_small():
    directory = shapes_model.ASSET_DIR
    for name in ("model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet", "clip",
                 "reward"):
        assert (directory / name).exists(), name
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert total < 20 * 2**20, total
    index = json.loads((directory / "model_index.json").read_text())
    quality = index["quality"]
    assert quality["real_heldout_shape_fidelity"] > 0.95
    assert quality["clip_heldout_top1"] > 0.2  # chance is 1/160


def test_load_and_sample(loaded):
    pipeline, params, _, _ = loaded
    prompts = world.prompts("heldout")[:4]
    fn = sampler_lib.jit_sampler(pipeline, sampler_lib.SamplerSpec(num_steps=5, eta=1.0,
                                                                  guidance_scale=3.0))
    samples = fn(params, params["unet"], jnp.asarray(pipeline.tokenize(prompts)),
                 jax.random.PRNGKey(0))
    images = np.asarray(samples.images)
    assert images.shape == (4, 32, 32, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
    again = fn(params, params["unet"], jnp.asarray(pipeline.tokenize(prompts)),
               jax.random.PRNGKey(0))
    np.testing.assert_array_equal(images, np.asarray(again.images))


@pytest.fixture(scope="module")
def reward_params(loaded):
    return shapes_model.load_reward("", loaded[2])


def test_the_reward_clip_is_loaded_for_clip_alignment_and_old_asset_dirs_fall_back(
        loaded, reward_params, tmp_path, caplog):
    from configs import shapes
    from vard_jax.models import loader

    _, _, clip_model, clip_params = loaded
    differs = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), reward_params,
                                     clip_params)
    assert any(jax.tree_util.tree_leaves(differs))  # trained further, not the world CLIP
    model = loader.load(shapes.get_config("tiny"))
    same = jax.tree_util.tree_map(np.array_equal, model.world_clip[1], reward_params)
    assert all(jax.tree_util.tree_leaves(same))
    # An asset directory written before the reward CLIP existed scores with its world CLIP.
    old = tmp_path / "old"
    old.mkdir()
    import shutil

    shutil.copytree(shapes_model.ASSET_DIR / "clip", old / "clip")
    with caplog.at_level("WARNING"):
        fallback = shapes_model.load_reward(old, clip_model)
    assert "no reward/ checkpoint" in caplog.text and "--reward_only" in caplog.text
    same = jax.tree_util.tree_map(np.array_equal, fallback, clip_params)
    assert all(jax.tree_util.tree_leaves(same))
    with pytest.raises(FileNotFoundError, match="--reward_only"):
        shapes_model.load_reward(tmp_path, clip_model)


def test_the_reward_scores_real_images_above_off_distribution_and_one_attribute_changes(
        loaded, reward_params):
    """What the hard negatives trained: each true caption above the same caption with one
    attribute changed, and real held-out images above blobs, flat and dark fields."""
    from vard_jax.worlds import negatives

    pipeline, _, clip_model, _ = loaded
    context = registry.RewardContext(world_clip=(clip_model, reward_params, pipeline.tokenizer))
    evaluate = registry.RewardEvaluator(registry.build("clip_alignment", context))
    rng = np.random.default_rng(5)
    specs = world.sample_specs(64, rng, "heldout")
    images = np.stack([world.render(s, rng) for s in specs])
    captions = [world.caption_of(s) for s in specs]
    right, _ = evaluate(images, captions)
    for attribute in ("color", "count", "background"):
        wrong, _ = evaluate(images, [world.caption_of(negatives.attribute_variant(s, attribute,
                                                                                   rng))
                                     for s in specs])
        assert np.mean(right > wrong) > 0.8, attribute
    for kind in ("blob", "flat", "dark"):
        off, _ = evaluate(negatives.off_distribution(64, rng, (kind,)), captions)
        assert np.mean(off < np.quantile(right, 0.1)) > 0.9, kind


def test_caption_choice_is_the_clip_log_probability_of_the_prompt_among_its_variants(
        loaded, reward_params):
    from vard_jax.models import clip as clip_lib
    from vard_jax.worlds import negatives

    pipeline, _, clip_model, _ = loaded
    context = registry.RewardContext(world_clip=(clip_model, reward_params, pipeline.tokenizer))
    reward = registry.build("caption_choice", context)
    assert reward.differentiable and reward.jittable
    images, captions = world.generate(8, seed=4, split="heldout")
    prepared = reward.prepare(captions)
    # One int array, as the training paths (DRaFT, direct last step, reward_init) take it.
    assert isinstance(prepared, np.ndarray) and prepared.dtype == np.int32
    scores = np.asarray(jax.jit(reward.score)(images, jnp.asarray(prepared)))
    # The same number from PickScore's scoring function, one caption at a time.
    for i in (0, 5):
        options = [captions[i]] + [world.caption_of(v) for v in
                                   negatives.all_variants(world.parse_caption(captions[i]))]
        ids = jnp.asarray(pipeline.tokenize(options))
        logits = clip_lib.clip_logits(clip_model, reward_params,
                                      jnp.repeat(images[i:i + 1], len(options), 0), ids)
        np.testing.assert_allclose(scores[i], logits[0] - jax.nn.logsumexp(logits), atol=1e-4)
    assert np.all(scores <= 1e-6)
    # Real held-out images near 0 (about -1.4: held-out shapes and positions are confused
    # with their variants); images that show nothing of the prompt far below (about -16).
    evaluate = registry.RewardEvaluator(reward)
    rng = np.random.default_rng(6)
    real, real_captions = world.generate(64, seed=6, split="heldout")
    right = evaluate(real, real_captions)[0]
    dark = evaluate(negatives.off_distribution(64, rng, ("flat", "dark")), real_captions)[0]
    assert np.median(right) > -2.5 and np.mean(dark < np.quantile(right, 0.1)) > 0.9
    grad = jax.grad(lambda x: jnp.sum(reward.score(x, prepared)))(jnp.asarray(images))
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0
    with pytest.raises(ValueError, match="outside the shapes-world grammar"):
        reward.prepare(["a photo of a cat"])


def test_clip_alignment_prefers_the_true_caption(loaded):
    pipeline, _, clip_model, clip_params = loaded
    context = registry.RewardContext(world_clip=(clip_model, clip_params, pipeline.tokenizer))
    evaluate = registry.RewardEvaluator(registry.build("clip_alignment", context))
    images, captions = world.generate(64, seed=3, split="heldout")
    wrong = []
    for caption in captions:  # another colour, same everything else
        spec = world.parse_caption(caption)
        other = next(c for c in world.COLORS if c != spec.color)
        wrong.append(caption.replace(spec.color, other, 1))
    right_scores, _ = evaluate(images, captions)
    wrong_scores, _ = evaluate(images, wrong)
    assert np.mean(right_scores > wrong_scores) > 0.8
    assert float(np.mean(right_scores - wrong_scores)) > 0.0


def test_reward_init_value_is_the_standardised_reward_of_the_clipped_prediction(
        reward_init_trainer):
    """value.arch = reward_init (through the trainer): before any training, V(x_0) is the
    standardised reward of x_0, and V(x_t) that of the reference model's one-step prediction
    (clipped like the sampler's; decoding to [0, 1] images clips the same pixels). The
    backbone is trainable."""
    from vard_jax.training.state import RewardStats

    trainer = reward_init_trainer
    model, pipeline, reward = trainer.value_model, trainer.pipeline, trainer.reward
    params = model.init(jax.random.PRNGKey(0))
    stats = RewardStats(mean=jnp.asarray(1.5), var=jnp.asarray(4.0), count=jnp.asarray(8.0))
    apply = jax.jit(model.apply)

    def standardised_reward(images, ids):
        return (reward.score(pipeline.decode(trainer.frozen, images), ids) - 1.5) / stats.std

    # Final states (t < 0) are scored as they are.
    images, captions = world.generate(8, seed=4, split="train")
    x0 = jnp.transpose(jnp.asarray(images), (0, 3, 1, 2)) * 2.0 - 1.0
    ids = jnp.asarray(reward.prepare(captions))
    context = pipeline.encode_ids(trainer.frozen["text_encoder"],
                                  jnp.asarray(pipeline.tokenize(captions)))
    aux = trainer.value_aux(stats, trainer.frozen, trainer.reference_params, ids)
    final = jnp.full((8,), -1, jnp.int32)
    np.testing.assert_allclose(apply(params, x0, final, context, aux),
                               standardised_reward(x0, ids), rtol=1e-4, atol=1e-4)
    # Noisy states: the reference model's prediction, clipped.
    x = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.full((8,), 500, jnp.int32)
    a = trainer.schedule.alphas_cumprod[500]
    eps = jax.jit(pipeline.eps_fn)(trainer.reference_params, x, t, context)
    x0_hat = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    np.testing.assert_allclose(apply(params, x, t, context, aux),
                               standardised_reward(jnp.clip(x0_hat, -1.0, 1.0), ids),
                               rtol=1e-4, atol=1e-4)
    # The backbone is trainable: its gradient is not zero.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x0, final, context, aux))))(params)
    assert float(jnp.abs(grads["backbone"]["text_projection"]["kernel"]).sum()) > 0


def test_value_gradient_alignment_is_one_for_the_reward_itself_and_flips_with_its_sign(
        reward_init_trainer, tmp_path):
    """Trainer.value_gradient_alignment: an untrained reward_init value is the standardised
    reward of the reference model's one-step prediction, so its gradient in every state of a
    rollout points exactly along the reward's (cosine 1); negating V's scale gives -1. A
    non-differentiable reward is refused with one line."""
    from vard_jax.training.loop import Loop

    trainer = reward_init_trainer
    state = trainer.init_state()
    prompts = world.prompts("train")[:4]
    rollouts, rewards = trainer.rollouts_with_rewards(state.policy_params, [prompts],
                                                      jax.random.PRNGKey(3))
    # Through the loop's value stage (value.log_grad_alignment): measured on the fresh
    # states before the value update.
    config = trainer.config.copy_and_resolve_references()
    config.value.log_grad_alignment = True
    loop = Loop(config, tmp_path, trainer=trainer)
    initial_value = jax.device_get(state.value_params)  # the update donates the state
    updated, aligned = loop.stage.value_update(state, rollouts, rewards, [prompts], (0, 0))
    for name in ("value_grad_cosine", *(f"value_grad_cosine_q{q}" for q in range(1, 5))):
        assert aligned[name] == pytest.approx(1.0, abs=1e-3), (name, aligned)
    assert aligned["value_grad_cosine_positive"] == 1.0
    assert int(updated.value_updates) == config.value.updates_per_epoch
    # Directly, on the stage's data, with the untrained V's scale negated:
    # V = (1 + a(t)) * r_std + b(t), and a bias of -2 on a(t)'s output makes the scale -1.
    dataset = trainer.value_dataset(rollouts, rewards, updated.reward_stats, prompts)
    assert dataset["states"].shape[0] == 4 * trainer.num_steps
    initial_value["affine"]["Dense_1"]["bias"] = np.array([-2.0, 0.0], np.float32)
    # Placed as the trainer places V (a default placement would compile the program anew).
    state = updated.replace(value_params=jax.tree_util.tree_map(
        lambda host, like: jax.device_put(host, like.sharding), initial_value,
        updated.value_params))
    flipped = trainer.value_gradient_alignment(state, dataset, prompts)
    assert flipped["value_grad_cosine"] == pytest.approx(-1.0, abs=1e-3), flipped
    assert flipped["value_grad_cosine_positive"] == 0.0
    reward = trainer.reward
    trainer.reward = dataclasses.replace(reward, name="jpeg_compressibility",
                                         differentiable=False)
    try:
        with pytest.raises(ValueError,
                           match="needs a differentiable reward; 'jpeg_compressibility'"):
            trainer.value_gradient_alignment(state, dataset, prompts)
    finally:
        trainer.reward = reward  # the fixture is shared


def test_conv_x0_value_reads_the_reference_models_clipped_prediction():
    """value.arch = conv_x0: the conv value of x0_hat(x_t) (reference model, clipped like the
    sampler), x_t itself at the final state, differentiable in x_t."""
    from configs import shapes
    from vard_jax.models import value as value_lib
    from vard_jax.training.trainer import Trainer

    config = shapes.get_config("tiny")
    config.value.arch = "conv_x0"
    trainer = Trainer(config)
    model, pipeline = trainer.value_model, trainer.pipeline
    params = model.init(jax.random.PRNGKey(0))
    # A non-zero head, so that the value depends on its input (the head starts at zero).
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    conv = value_lib.conv_value(pipeline.sample_shape, (pipeline.max_length,
                                                        pipeline.unet.config.cross_attention_dim),
                                config.value.width)
    stats = trainer.init_state().reward_stats
    apply_x0, apply_conv = jax.jit(model.apply), jax.jit(conv.apply)
    aux = trainer.value_aux(stats, trainer.frozen, trainer.reference_params, None)
    key_x, key_c = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(key_x, (4,) + pipeline.sample_shape)
    context = pipeline.encode_ids(trainer.frozen["text_encoder"], jnp.asarray(
        pipeline.tokenize(["a red circle on a white background"] * 4)))
    final = jnp.full((4,), -1, jnp.int32)
    x_clean = jnp.clip(x, -1.0, 1.0)
    np.testing.assert_allclose(apply_x0(params, x_clean, final, context, aux),
                               apply_conv(params, x_clean, final, context, {}), rtol=1e-5,
                               atol=1e-5)
    t = jnp.full((4,), 500, jnp.int32)
    a = trainer.schedule.alphas_cumprod[500]
    eps = jax.jit(pipeline.eps_fn)(trainer.reference_params, x, t, context)
    x0 = jnp.clip((x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a), -1.0, 1.0)
    np.testing.assert_allclose(apply_x0(params, x, t, context, aux),
                               apply_conv(params, x0, t, context, {}), rtol=1e-4, atol=1e-4)
    assert not np.allclose(apply_x0(params, x, t, context, aux),
                           apply_conv(params, x, t, context, {}), atol=1e-3)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(params, v, t, context, aux))))(x)
    assert float(jnp.abs(grad).sum()) > 0.0


def test_unet_head_value_is_a_head_on_the_reference_unets_mid_block_features():
    """value.arch = unet_head: a head on the frozen reference UNet's mid-block output at
    (x_t, t, c), differentiable in x_t; the train step updates it."""
    from configs import shapes
    from vard_jax.models import value as value_lib
    from vard_jax.training.trainer import Trainer

    config = shapes.get_config("tiny")
    config.value.arch = "unet_head"
    trainer = Trainer(config)
    model, pipeline = trainer.value_model, trainer.pipeline
    assert model.name == "unet_head"
    params = jax.tree_util.tree_map(lambda p: p + 0.05, model.init(jax.random.PRNGKey(0)))
    aux = trainer.value_aux(trainer.init_state().reward_stats, trainer.frozen,
                            trainer.reference_params, None)
    x = jax.random.normal(jax.random.PRNGKey(1), (4,) + pipeline.sample_shape)
    context = pipeline.encode_ids(trainer.frozen["text_encoder"], jnp.asarray(
        pipeline.tokenize(["a red circle on a white background"] * 4)))
    t = jnp.full((4,), 500, jnp.int32)
    features = pipeline.unet.apply({"params": trainer.reference_params}, x, t, context).mid
    head = value_lib.MidFeatureHead(width=config.value.width)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x, t, context, aux),
                               head.apply({"params": params}, features, t, context),
                               rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(params, v, t, context, aux))))(x)
    assert float(jnp.abs(grad).sum()) > 0.0
    final = jnp.full((4,), -1, jnp.int32)  # after the last step: features of t = 0
    assert np.isfinite(np.asarray(jax.jit(model.apply)(params, x, final, context, aux))).all()


@pytest.mark.slow  # experiments/pretrain_shapes.py (made the shipped assets): -m slow
def test_pretrain_script_evaluates_shipped_weights_again(tmp_path, loaded):
    """--evaluate_only re-measures the quality figures of an asset directory with the current
    sampler and writes them beside the same weights, keeping the training figures."""
    from tests.test_entry_points import run_module

    out = tmp_path / "assets"
    done = run_module("experiments.pretrain_shapes", "--evaluate_only",
                      f"--init_from={shapes_model.ASSET_DIR}", f"--out={out}",
                      "--eval_samples=4", "--eval_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = json.loads((shapes_model.ASSET_DIR / "model_index.json").read_text())["quality"]
    written = json.loads((out / "model_index.json").read_text())
    assert written["schedule"]["clip_sample"] is True
    quality = written["quality"]
    for key in ("unet_steps", "unet_final_loss", "clip_heldout_top1"):
        assert quality[key] == shipped[key], key
    assert quality["eval_steps"] == 2 and 0.0 <= quality["base_heldout_shape_fidelity"][0] <= 1.0
    assert (out / "base_samples.png").stat().st_size > 0
    _, params, _, _ = shapes_model.load(out)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params["unet"],
                                  loaded[1]["unet"])
    assert all(jax.tree_util.tree_leaves(same))

    # The reward CLIP comes along unchanged.
    assert written["reward"] == json.loads(
        (shapes_model.ASSET_DIR / "model_index.json").read_text())["reward"]
    same = jax.tree_util.tree_map(np.array_equal, shapes_model.load_reward(out, loaded[2]),
                                  shapes_model.load_reward("", loaded[2]))
    assert all(jax.tree_util.tree_leaves(same))

    missing = run_module("experiments.pretrain_shapes", "--evaluate_only", f"--out={out}")
    assert missing.returncode != 0 and "--evaluate_only needs --init_from" in missing.stderr


@pytest.mark.slow  # experiments/pretrain_shapes.py from scratch, two models: -m slow
def test_pretrain_script_trains_from_scratch_and_writes_loadable_assets(tmp_path, loaded):
    """The from-scratch path in miniature: both models train, the figures are printed and
    written, and the asset directory loads like the shipped one."""
    from tests.test_entry_points import run_module

    out = tmp_path / "scratch"
    done = run_module("experiments.pretrain_shapes", f"--out={out}", "--clip_steps=3",
                      "--clip_batch=8", "--unet_steps=3", "--unet_batch=4", "--eval_samples=2",
                      "--eval_steps=2", "--reward_steps=2", "--reward_batch=4", "--reward_off=2")
    assert done.returncode == 0, done.stderr[-2000:]
    quality = json.loads((out / "model_index.json").read_text())["quality"]
    assert quality["unet_steps"] == 3 and np.isfinite(quality["unet_final_loss"])
    assert quality["real_heldout_shape_fidelity"] > 0.9  # the data, not the model
    assert 0.0 <= quality["clip_heldout_top1"] <= 1.0
    assert (out / "base_samples.png").stat().st_size > 0
    reward = json.loads((out / "model_index.json").read_text())["reward"]
    assert reward["reward_steps"] == 2 and 0.0 <= reward["figures"]["heldout_color_accuracy"] <= 1
    _, params, clip_model, _ = shapes_model.load(out)
    shapes_model.load_reward(out, clip_model)  # written with the world
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params["unet"],
                                     loaded[1]["unet"])
    assert not all(jax.tree_util.tree_leaves(changed))  # new weights, not the shipped ones


@pytest.mark.slow  # experiments/pretrain_shapes.py --reward_only: -m slow
def test_pretrain_script_trains_the_reward_clip_alone(tmp_path, loaded):
    from tests.test_entry_points import run_module

    out = tmp_path / "reward_only"
    done = run_module("experiments.pretrain_shapes", "--reward_only", f"--out={out}",
                      "--reward_steps=2", "--reward_batch=4", "--reward_off=2")
    assert done.returncode == 0, done.stderr[-2000:]
    reward = json.loads((out / "model_index.json").read_text())["reward"]
    for key in ("figures", "world_clip_figures"):
        assert 0.0 <= reward[key]["heldout_top1"] <= 1.0
        assert set(reward[key]) >= {"off_blob_score", "train_shape_accuracy"}
    params = shapes_model.load_reward(out, loaded[2])
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), params, loaded[3])
    assert any(jax.tree_util.tree_leaves(changed))  # trained from the world CLIP
