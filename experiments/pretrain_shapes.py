"""Trains the embedded default from scratch on CPU and writes it into the package.

1. A tiny CLIP (``FlaxCLIPModel``) trained contrastively on (image, caption) pairs of the shapes
   world's training split: through its text tower, the frozen text encoder of the diffusion
   model. The ``clip_alignment`` reward is this CLIP trained further with one-attribute hard
   negatives and off-distribution images (``vard_jax.worlds.negatives``; ``--reward_only``
   trains only it, from the CLIP of ``--init_from``).
2. A tiny pixel-space ``FlaxUNet2DConditionModel``, trained as an eps-prediction DDPM on the
   same split with 10% condition dropout (so classifier-free guidance works); the shipped
   weights are an exponential moving average.
3. Quality figures: CLIP top-1 retrieval on held-out pairs; the base model's shape_fidelity
   and clip_alignment on training and held-out prompts at the demo's guidance; a sample grid.

``--flow`` trains the world's flow-matching model instead (``shapes_model.MMDIT_CONFIG``, a
tiny SD 3.5-style MMDiT; rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0,
t logit-normal as SD3 trains, the same condition dropout and EMA) on the CLIP of
``--init_from`` (default: the shipped one), writes ``transformer/`` and its figures (Euler
sampling, ``--flow_eval_eta`` 0) into ``--out``, and leaves the rest of ``--out`` as it is.

    python experiments/pretrain_shapes.py                  # ~40 min on 2 CPU cores
    python experiments/pretrain_shapes.py --clip_steps=50 --unet_steps=20 --out=/tmp/w  # smoke
    python experiments/pretrain_shapes.py --init_from=DIR --evaluate_only   # figures of DIR again
    python experiments/pretrain_shapes.py --reward_only       # the reward CLIP only (~15 min)
    python experiments/pretrain_shapes.py --flow              # the flow model only

``--init_from`` continues from an asset directory; with ``--evaluate_only`` nothing is trained:
the quality figures and the grid are measured again with the current sampler and written
into ``--out`` with the weights of ``--init_from`` (the training figures are kept).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from vard_jax.diffusion import sampler as sampler_lib
from vard_jax.diffusion import flow as flow_lib
from vard_jax.diffusion.schedule import add_noise, alphas_cumprod_for
from vard_jax.models import clip as clip_lib
from vard_jax.models import shapes as shapes_model
from vard_jax.rewards.shape_fidelity import shape_fidelity
from vard_jax.training import images as grid_lib
from vard_jax.worlds import negatives
from vard_jax.worlds import shapes as world
from vard_jax.worlds import tokenizer_files

FLAGS = flags.FLAGS
flags.DEFINE_string("out", str(shapes_model.ASSET_DIR), "Asset directory to write.")
flags.DEFINE_integer("seed", 0, "Seed of data, initialisation and sampling.")
flags.DEFINE_integer("clip_steps", 1500, "CLIP training steps.")
flags.DEFINE_integer("clip_batch", 128, "CLIP batch size.")
flags.DEFINE_integer("unet_steps", 1200, "UNet training steps (upper bound).")
flags.DEFINE_float("unet_minutes", 28.0, "Wall-clock budget of UNet training, minutes.")
flags.DEFINE_integer("unet_batch", 64, "UNet batch size.")
flags.DEFINE_float("cond_dropout", 0.1, "Probability of training on the empty prompt.")
flags.DEFINE_float("ema_decay", 0.995, "EMA decay of the shipped UNet weights.")
flags.DEFINE_integer("eval_samples", 64, "Samples per split for the quality figures.")
flags.DEFINE_integer("eval_steps", 20, "DDIM steps for the quality figures.")
flags.DEFINE_float("guidance_scale", 3.0, "Guidance for the quality figures (the demo's).")
flags.DEFINE_string("init_from", "", "Continue from the CLIP and UNet in this asset directory "
                    "(the CLIP is kept; the UNet training resumes from its weights).")
flags.DEFINE_float("unet_lr", 1e-3, "Peak UNet learning rate.")
flags.DEFINE_bool("reward_only", False, "Train only the reward CLIP (hard negatives and "
                  "off-distribution images) from the CLIP of --init_from (default: the shipped "
                  "one) and write it to --out/reward; the rest of --out is left as it is.")
flags.DEFINE_integer("reward_steps", 1500, "Reward CLIP training steps.")
flags.DEFINE_integer("reward_batch", 64, "Reward CLIP batch of real pairs.")
flags.DEFINE_integer("reward_hard", 3, "Hard negatives (one attribute changed) per pair.")
flags.DEFINE_integer("reward_off", 40, "Off-distribution images per batch.")
flags.DEFINE_bool("flow", False, "Train the flow-matching MMDiT (transformer/) on the CLIP of "
                  "--init_from (default: the shipped one) with the --unet_* budget and settings; "
                  "the rest of --out is left as it is.")
flags.DEFINE_float("flow_eval_eta", 0.0, "Noise level of the flow model's quality figures "
                   "(0: Euler steps of the ODE).")
flags.DEFINE_bool("evaluate_only", False, "With --init_from: train nothing, measure the quality "
                  "figures of those weights again and write them with the weights to --out.")


def train_clip(clip_model, tokenizer, key):
    params = shapes_model.init_clip_params(clip_model, key)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 1e-3, min(100, FLAGS.clip_steps // 2), FLAGS.clip_steps, 1e-5)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    def loss_fn(p, images, ids, same):
        image = clip_lib.image_embeddings(clip_model, p, images)
        text = clip_lib.text_embeddings(clip_model, p, ids)
        logits = jnp.exp(p["logit_scale"]) * image @ text.T  # [B, B]
        targets = same / same.sum(-1, keepdims=True)  # identical captions are all positives
        loss_i = optax.softmax_cross_entropy(logits, targets).mean()
        loss_t = optax.softmax_cross_entropy(logits.T, targets).mean()
        return 0.5 * (loss_i + loss_t)

    @jax.jit
    def step(p, s, images, ids, same):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, ids, same)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    start = time.time()
    for i in range(FLAGS.clip_steps):
        images, captions = world.generate(FLAGS.clip_batch, seed=10_000 + i, split="train")
        ids = tokenizer_files.encode_captions(tokenizer, captions)
        same = (np.asarray(captions)[:, None] == np.asarray(captions)[None, :]).astype(np.float32)
        params, opt_state, loss = step(params, opt_state, images, ids, same)
        if i % 250 == 0 or i == FLAGS.clip_steps - 1:
            print(f"clip step {i}: loss {float(loss):.3f} ({time.time() - start:.0f}s)", flush=True)
    return params


def _batch_with_negatives(step: int, tokenizer):
    """Real pairs of the training split, one-attribute hard negatives (images and captions)
    and off-distribution images, deterministic in ``step``."""
    rng = np.random.default_rng(30_000 + 100_000 * FLAGS.seed + step)
    specs = world.sample_specs(FLAGS.reward_batch, rng, "train")
    images = np.stack([world.render(s, rng) for s in specs])
    variants = [v for s in specs for v in negatives.hard_negatives(s, FLAGS.reward_hard, rng)]
    # Per caption: its one-attribute variants rendered, then one corrupted rendering.
    hard = [world.render(v, rng) for v in variants]
    corrupted = [negatives.corrupted(s, negatives.CORRUPTIONS[i % len(negatives.CORRUPTIONS)],
                                     rng) for i, s in enumerate(specs)]
    k = FLAGS.reward_hard
    hard_images = np.stack([image for i in range(len(specs))
                            for image in hard[i * k:(i + 1) * k] + [corrupted[i]]])
    captions = [world.caption_of(s) for s in specs]
    ids = tokenizer_files.encode_captions(tokenizer, captions)
    hard_ids = tokenizer_files.encode_captions(tokenizer, [world.caption_of(v) for v in variants])
    same = (np.asarray(captions)[:, None] == np.asarray(captions)[None, :]).astype(np.float32)
    off = negatives.off_distribution(FLAGS.reward_off, rng)
    return images, ids, same, hard_images, hard_ids, off


def reward_loss(clip_model, p, images, ids, same, hard_images, hard_ids, off):
    """Contrastive loss with hard negatives: an image against the batch's captions and its own
    K one-attribute-changed captions; a caption against the batch's images, its K
    one-attribute-changed images and one corrupted rendering of its scene, and the
    off-distribution images."""
    batch, k = images.shape[0], hard_ids.shape[0] // images.shape[0]
    image = clip_lib.image_embeddings(clip_model, p, jnp.concatenate([images, hard_images, off]))
    text = clip_lib.text_embeddings(clip_model, p, jnp.concatenate([ids, hard_ids]))
    real_image, hard_image, off_image = jnp.split(image, [batch, batch * (k + 2)])
    real_text, hard_text = text[:batch], text[batch:].reshape(batch, k, -1)
    hard_image = hard_image.reshape(batch, k + 1, -1)
    scale = jnp.exp(p["logit_scale"])
    pairs = real_image @ real_text.T  # [B images, B captions]
    image_to_text = jnp.concatenate([pairs, jnp.einsum("bd,bkd->bk", real_image, hard_text)], -1)
    text_to_image = jnp.concatenate([pairs.T, jnp.einsum("bd,bkd->bk", real_text, hard_image),
                                     real_text @ off_image.T], -1)
    targets = same / same.sum(-1, keepdims=True)  # identical captions are all positives
    loss_i = optax.softmax_cross_entropy(scale * image_to_text,
                                         jnp.pad(targets, ((0, 0), (0, k)))).mean()
    loss_t = optax.softmax_cross_entropy(
        scale * text_to_image, jnp.pad(targets, ((0, 0), (0, k + 1 + off.shape[0])))).mean()
    return 0.5 * (loss_i + loss_t)


def train_reward_clip(clip_model, tokenizer, init_params):
    """The reward CLIP: the world CLIP trained further with hard and off-distribution
    negatives (``vard_jax.worlds.negatives``)."""
    params = init_params
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 5e-4, min(100, FLAGS.reward_steps // 2), FLAGS.reward_steps, 1e-5)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(p, s, *batch):
        loss, grads = jax.value_and_grad(functools.partial(reward_loss, clip_model))(p, *batch)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    start, losses = time.time(), []
    for i in range(FLAGS.reward_steps):
        params, opt_state, loss = step(params, opt_state, *_batch_with_negatives(i, tokenizer))
        losses.append(float(loss))
        if i % 100 == 0 or i == FLAGS.reward_steps - 1:
            print(f"reward clip step {i}: loss {np.mean(losses[-100:]):.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    return params, {"reward_steps": FLAGS.reward_steps,
                    "reward_final_loss": float(np.mean(losses[-100:])),
                    "reward_train_seconds": round(time.time() - start, 1)}


def reward_figures(clip_model, params, tokenizer, n: int = 512) -> dict:
    """What a reward model of the world should get right: retrieval, each attribute against
    its one-attribute-changed caption, and real images scored above off-distribution ones."""
    score = jax.jit(lambda im, ids: clip_lib.clip_logits(clip_model, params, im, ids))
    figures = {}
    for split in ("train", "heldout"):
        figures[f"{split}_top1"] = clip_retrieval_accuracy(clip_model, params, tokenizer, split, n)
        rng = np.random.default_rng(4242)
        specs = world.sample_specs(n, rng, split)
        images = np.stack([world.render(s, rng) for s in specs])
        true = np.asarray(score(images, tokenizer_files.encode_captions(
            tokenizer, [world.caption_of(s) for s in specs])))
        figures[f"{split}_real_score"] = [float(true.mean()), float(true.std())]
        for attribute in negatives.ATTRIBUTES:
            keep = [i for i, s in enumerate(specs)
                    if negatives.attribute_variant(s, attribute, rng) is not None]
            changed = [world.caption_of(negatives.attribute_variant(specs[i], attribute, rng))
                       for i in keep]
            wrong = np.asarray(score(images[keep], tokenizer_files.encode_captions(tokenizer,
                                                                                   changed)))
            figures[f"{split}_{attribute}_accuracy"] = float(np.mean(true[keep] > wrong))
    rng = np.random.default_rng(4243)
    captions = [world.caption_of(s) for s in world.sample_specs(n, rng, "heldout")]
    ids = tokenizer_files.encode_captions(tokenizer, captions)
    real_floor = np.quantile(true, 0.1)  # of held-out real images with their own captions
    specs = world.sample_specs(n, rng, "heldout")
    ids_of_specs = tokenizer_files.encode_captions(tokenizer, [world.caption_of(s) for s in specs])
    for kind in negatives.CORRUPTIONS:
        images = np.stack([negatives.corrupted(s, kind, rng) for s in specs])
        scores = np.asarray(score(images, ids_of_specs))
        figures[f"corrupted_{kind}_score"] = [float(scores.mean()), float(scores.std())]
        figures[f"corrupted_{kind}_above_real_p10"] = float(np.mean(scores > real_floor))
    for kind in negatives.OFF_DISTRIBUTION_KINDS:
        images = negatives.off_distribution(n, rng, (kind,))
        scores = np.asarray(score(images, ids))
        figures[f"off_{kind}_score"] = [float(scores.mean()), float(scores.std())]
        figures[f"off_{kind}_above_real_p10"] = float(np.mean(scores > real_floor))
    return figures


def clip_retrieval_accuracy(clip_model, params, tokenizer, split: str, n: int = 512) -> float:
    """Top-1 retrieval of an image's caption among all captions of the split."""
    captions = world.all_prompts(split)
    images, truth = world.generate(n, seed=777, split=split)
    text = clip_lib.text_embeddings(clip_model, params,
                                    tokenizer_files.encode_captions(tokenizer, captions))
    image = clip_lib.image_embeddings(clip_model, params, images)
    best = np.asarray(jnp.argmax(image @ text.T, axis=-1))
    return float(np.mean([captions[j] == t for j, t in zip(best, truth)]))


def train_unet(pipeline, text_params, key, init_params=None):
    """The eps-prediction DDPM loss with uniform timesteps."""
    return train_denoiser(pipeline, text_params, key, init_params, _ddpm_loss)


def _ddpm_loss(pipeline, p, x0, context, key):
    key_t, key_n = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, pipeline.schedule.num_train_timesteps)
    noise = jax.random.normal(key_n, x0.shape)
    x_t = add_noise(jnp.asarray(alphas_cumprod_for(pipeline.schedule)), x0, noise, t)
    return jnp.mean((pipeline.eps_fn(p, x_t, t, context) - noise) ** 2)


def train_denoiser(pipeline, text_params, key, init_params, loss_of):
    """AdamW (warm-up, cosine) on ``loss_of(pipeline, params, x0, context, key)`` with 10 %
    condition dropout and an EMA of the weights, for ``--unet_steps`` or ``--unet_minutes``."""
    if init_params is None:
        init = (shapes_model.init_flow_params if FLAGS.flow else shapes_model.init_unet_params)
        params = init(pipeline.unet, key)
    else:
        params = init_params
    ema = params
    warmup = min(200 if init_params is None else 50, FLAGS.unet_steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.unet_lr, warmup, FLAGS.unet_steps,
                                                  5e-5)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    # Every caption the world can produce, plus the empty prompt, encoded once.
    all_captions = [""] + world.all_prompts("train") + world.all_prompts("heldout")
    index = {c: i for i, c in enumerate(all_captions)}
    table = jax.jit(pipeline.encode_ids)(text_params, jnp.asarray(pipeline.tokenize(all_captions)))

    @jax.jit
    def step(p, e, s, images, caption_idx, key):
        key_loss, key_d = jax.random.split(key)
        x0 = jnp.transpose(images, (0, 3, 1, 2)) * 2.0 - 1.0  # [B, 3, H, W] in [-1, 1]
        drop = jax.random.uniform(key_d, (x0.shape[0],)) < FLAGS.cond_dropout
        context = table[jnp.where(drop, 0, caption_idx)]
        loss, grads = jax.value_and_grad(
            lambda p: loss_of(pipeline, p, x0, context, key_loss))(p)
        updates, s = optimizer.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        e = jax.tree_util.tree_map(lambda a, b: FLAGS.ema_decay * a + (1 - FLAGS.ema_decay) * b,
                                   e, p)
        return p, e, s, loss

    start, losses = time.time(), []
    key = jax.random.PRNGKey(FLAGS.seed + 1)
    for i in range(FLAGS.unet_steps):
        images, captions = world.generate(FLAGS.unet_batch, seed=20_000 + 100_000 * FLAGS.seed + i,
                                         split="train")
        caption_idx = jnp.asarray([index[c] for c in captions])
        params, ema, opt_state, loss = step(params, ema, opt_state, images, caption_idx,
                                            jax.random.fold_in(key, i))
        losses.append(float(loss))
        elapsed = time.time() - start
        if i % 50 == 0:
            print(f"denoiser step {i}: loss {np.mean(losses[-50:]):.4f} ({elapsed:.0f}s)",
                  flush=True)
        if elapsed > FLAGS.unet_minutes * 60:
            print(f"denoiser: time budget reached after {i + 1} steps", flush=True)
            break
    return ema, {"unet_steps": i + 1, "unet_final_loss": float(np.mean(losses[-50:])),
                 "unet_train_seconds": round(time.time() - start, 1)}


def train_flow(pipeline, text_params, key, init_params=None):
    """Rectified flow for the MMDiT (module docstring); the loop and budget of ``train_unet``."""
    return train_denoiser(pipeline, text_params, key, init_params, _flow_loss)


def _flow_loss(pipeline, p, x0, context, key):
    key_t, key_n = jax.random.split(key)
    t = jax.nn.sigmoid(jax.random.normal(key_t, (x0.shape[0],)))  # logit-normal (SD3)
    noise = jax.random.normal(key_n, x0.shape)
    x_t = flow_lib.add_noise(x0, noise, t)
    velocity = pipeline.eps_fn(p, x_t, t * pipeline.schedule.num_train_timesteps, context)
    return jnp.mean((velocity - (noise - x0)) ** 2)


def evaluate_base(pipeline, params, clip_model, reward_params, out: pathlib.Path,
                  eta: float = 1.0, grid_name: str = "base_samples.png") -> dict:
    """The base model's shape_fidelity and clip_alignment (the reward CLIP's score)."""
    spec = sampler_lib.SamplerSpec(FLAGS.eval_steps, eta, FLAGS.guidance_scale)
    fn = sampler_lib.jit_sampler(pipeline, spec)
    score = jax.jit(lambda p, im, ids: clip_lib.clip_logits(clip_model, p, im, ids))
    figures, grids = {}, []
    for split in ("train", "heldout"):
        rng = np.random.default_rng(FLAGS.seed)
        prompts = list(rng.choice(world.all_prompts(split), FLAGS.eval_samples))
        ids = jnp.asarray(pipeline.tokenize(prompts))
        samples = fn(params, params["unet"], ids, jax.random.PRNGKey(FLAGS.seed + 7))
        images = np.asarray(samples.images)
        fidelity = shape_fidelity(images, prompts)
        alignment = np.asarray(score(reward_params, samples.images, ids))
        figures[f"base_{split}_shape_fidelity"] = [float(fidelity.mean()), float(fidelity.std())]
        figures[f"base_{split}_clip_alignment"] = [float(alignment.mean()), float(alignment.std())]
        grids.append((images[:16], prompts[:16], fidelity[:16]))
    images = np.concatenate([g[0] for g in grids])
    prompts = sum([g[1] for g in grids], [])
    scores = np.concatenate([g[2] for g in grids])
    grid_lib.save_grid(out / grid_name, images, prompts, scores, columns=8,
                       score_name="fidelity")
    return figures


def train_flow_model(tokenizer, clip_model, key, out: pathlib.Path) -> None:
    """``--flow``: the flow model on the CLIP of ``--init_from`` (default: the shipped one),
    continued from its ``transformer/`` with ``--init_from``; written to ``--out``."""
    source = FLAGS.init_from or shapes_model.ASSET_DIR
    _, _, _, clip_params = shapes_model.load(source)
    pipeline = shapes_model.build_flow_pipeline(tokenizer, clip_model)
    text_params = shapes_model.flow_text_params(clip_params)
    init = None
    if FLAGS.init_from and (pathlib.Path(FLAGS.init_from) / shapes_model.FLOW_DIR).exists():
        init = shapes_model.load(FLAGS.init_from, flow=True)[1]["unet"]
    if FLAGS.evaluate_only:
        if init is None:
            raise app.UsageError("--flow --evaluate_only needs --init_from=DIR with a "
                                 f"{shapes_model.FLOW_DIR}/ checkpoint")
        params, figures = init, {}
    else:
        params, figures = train_flow(pipeline, text_params, key, init)
    figures = {k.replace("unet_", "transformer_"): v for k, v in figures.items()}
    reward_params = shapes_model.load_reward(source, clip_model)
    figures.update(evaluate_base(pipeline, {"unet": params, "text_encoder": text_params},
                                 clip_model, reward_params, out, eta=FLAGS.flow_eval_eta,
                                 grid_name="flow_base_samples.png"))
    figures.update(eval_eta=FLAGS.flow_eval_eta, eval_steps=FLAGS.eval_steps,
                   eval_guidance_scale=FLAGS.guidance_scale)
    shapes_model.save_flow(out, params, figures)
    print(json.dumps(figures, indent=2), flush=True)


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    key_clip, key_unet = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
    tokenizer_dir = out / "tokenizer"
    tokenizer_files.write_tokenizer_files(tokenizer_dir)
    tokenizer = tokenizer_files.load_tokenizer(tokenizer_dir)
    clip_model = shapes_model.build_clip(tokenizer)
    pipeline = shapes_model.build_pipeline(tokenizer, clip_model)

    if FLAGS.flow:
        train_flow_model(tokenizer, clip_model, key_unet, out)
        return

    if FLAGS.reward_only:
        _, _, _, clip_params = shapes_model.load(FLAGS.init_from or shapes_model.ASSET_DIR)
        reward_params, reward_info = train_reward_clip(clip_model, tokenizer, clip_params)
        reward_info["figures"] = reward_figures(clip_model, reward_params, tokenizer)
        reward_info["world_clip_figures"] = reward_figures(clip_model, clip_params, tokenizer)
        shapes_model.save_reward(out, reward_params, reward_info)
        print(json.dumps(reward_info, indent=2), flush=True)
        return

    start = time.time()
    figures, init_unet = {}, None
    if FLAGS.evaluate_only and not FLAGS.init_from:
        raise app.UsageError("--evaluate_only needs --init_from=DIR (the weights to evaluate)")
    if FLAGS.init_from:
        _, previous, _, clip_params = shapes_model.load(FLAGS.init_from)
        index = json.loads((pathlib.Path(FLAGS.init_from) / "model_index.json").read_text())
        earlier = index.get("quality", {})
    if FLAGS.evaluate_only:
        figures = {k: v for k, v in earlier.items() if k.startswith(("clip_", "unet_"))}
        unet_params = previous["unet"]
    elif FLAGS.init_from:
        init_unet = previous["unet"]
        figures = {k: v for k, v in earlier.items() if k.startswith("clip_")}
        figures["unet_steps_before"] = earlier.get("unet_steps_before", 0) + earlier.get("unet_steps", 0)
        figures["unet_train_seconds_before"] = (earlier.get("unet_train_seconds_before", 0.0)
                                                + earlier.get("unet_train_seconds", 0.0))
    else:
        clip_params = train_clip(clip_model, tokenizer, key_clip)
        figures = {"clip_train_seconds": round(time.time() - start, 1),
                   "clip_heldout_top1": clip_retrieval_accuracy(clip_model, clip_params, tokenizer,
                                                                "heldout"),
                   "clip_train_top1": clip_retrieval_accuracy(clip_model, clip_params, tokenizer,
                                                              "train")}
    print(json.dumps(figures), flush=True)

    text_params = shapes_model.text_encoder_params(clip_params)
    if not FLAGS.evaluate_only:
        unet_params, unet_figures = train_unet(pipeline, text_params, key_unet, init_unet)
        figures.update(unet_figures)
    params = {"unet": unet_params, "text_encoder": text_params}
    if FLAGS.init_from and (pathlib.Path(FLAGS.init_from) / shapes_model.REWARD_DIR).exists():
        reward_params = shapes_model.load_reward(FLAGS.init_from, clip_model)  # unchanged
        reward_info = index.get("reward", {})
    elif FLAGS.init_from:  # written before the reward CLIP: base figures with the world CLIP
        reward_params, reward_info = clip_params, None
    else:  # a new world CLIP: its reward CLIP too
        reward_params, reward_info = train_reward_clip(clip_model, tokenizer, clip_params)
        reward_info["figures"] = reward_figures(clip_model, reward_params, tokenizer)
    figures.update(evaluate_base(pipeline, params, clip_model, reward_params, out))
    real_train, real_train_caps = world.generate(256, seed=5, split="train")
    real_held, real_held_caps = world.generate(256, seed=5, split="heldout")
    figures["real_train_shape_fidelity"] = float(shape_fidelity(real_train, real_train_caps).mean())
    figures["real_heldout_shape_fidelity"] = float(shape_fidelity(real_held, real_held_caps).mean())
    figures["eval_guidance_scale"] = FLAGS.guidance_scale
    figures["eval_steps"] = FLAGS.eval_steps
    shapes_model.save(out, unet_params, clip_params, {"quality": figures})
    if reward_info is not None:
        shapes_model.save_reward(out, reward_params, reward_info)
    print(json.dumps(figures, indent=2), flush=True)


if __name__ == "__main__":
    app.run(main)
