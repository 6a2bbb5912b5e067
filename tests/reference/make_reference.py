"""Writes the reference outputs in ``data/`` with diffusers' and transformers' PyTorch classes.

Run once, in an environment with torch, diffusers and transformers (not needed by the tests):

    python tests/reference/make_reference.py

Each case is a tiny random configuration; the weights come from ``weights.py`` (by key name and
shape), the inputs from a fixed numpy seed. ``data/<case>.json`` records the model class, its
config, the library versions and the state dict's key -> shape; ``data/<case>.npz`` the inputs
and the outputs. The tests write the same weights as PyTorch-layout safetensors, load them with
vard_jax's loaders, and compare.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import weights  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data"

UNET_BASE = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                 cross_attention_dim=32, norm_num_groups=32)
UNET_CASES = {
    # SD 1.x: 1x1-conv projections around attention, heads as one number.
    "unet_sd1": dict(UNET_BASE, in_channels=4, out_channels=4, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: linear projections, heads per block, upcast attention.
    "unet_sd2": dict(UNET_BASE, in_channels=4, out_channels=4, attention_head_dim=(2, 4),
                     use_linear_projection=True, upcast_attention=True,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL: added time/text conditioning, transformer depth per block.
    "unet_sdxl": dict(UNET_BASE, in_channels=4, out_channels=4, attention_head_dim=(2, 4),
                      use_linear_projection=True, transformer_layers_per_block=(1, 2),
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 24,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
VAE_CASES = {
    "vae_sd": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                   layers_per_block=1, sample_size=16,
                   down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2),
    # SD3-style: 16 latent channels, no 1x1 quant convs, shifted latents.
    "vae_sd3": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                    layers_per_block=1, sample_size=16, use_quant_conv=False,
                    use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2),
}
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=99, max_position_embeddings=12, projection_dim=24)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, projection_dim=24)
CLIP_CASES = {
    # OpenAI CLIP: quick_gelu, end of text found by argmax (eos id 2 is the legacy marker).
    "clip_legacy_eos": dict(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION,
                            projection_dim=24),
    # Newer checkpoints: gelu, the configured end-of-text id.
    "clip_gelu": dict(text_config=dict(TEXT, eos_token_id=98, hidden_act="gelu"),
                      vision_config=dict(VISION, hidden_act="gelu"), projection_dim=24),
}
TEXT_PROJECTION_CASE = dict(TEXT, eos_token_id=98, hidden_act="gelu")

#: Scheduler settings: diffusers' defaults (with x0 clipping), SD 1.x's, SD 2.x's v-prediction.
SCHEDULERS = {
    "default": dict(clip_sample=True),
    "sd": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
               clip_sample=False),
    "sd2_v": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                  clip_sample=False, prediction_type="v_prediction"),
}
DDIM_ETAS, DDIM_STEPS = (0.0, 0.5, 1.0), (10, 50)
#: Texts for the tokenizer: casing, spaces, punctuation, unknown words, accents, truncation.
TOKENIZER_TEXTS = ["a red circle on a blue background",
                   "Two  GREEN squares!!, left of 3 pink hexagons", "xyzzy qwerty don't",
                   "a" * 40, "one two three four five six seven eight nine ten eleven twelve "
                   "thirteen fourteen fifteen", "", "héllo wörld", "a pink hexagon"]
SHAPES_TOKENIZER = DATA.parents[2] / "vard_jax" / "assets" / "shapes" / "tokenizer"
#: A tiny OpenCLIP ViT (the architecture of HPS v2.1, in open_clip's own config format).
OPEN_CLIP_CONFIG = {"embed_dim": 24,
                    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 8,
                                   "patch_size": 4},
                    "text_cfg": {"context_length": 12, "vocab_size": 99, "width": 32,
                                 "heads": 4, "layers": 2}}


def _load(model, seed: int) -> dict:
    state = model.state_dict()
    shapes = {k: list(v.shape) for k, v in state.items() if v.is_floating_point()}
    values = weights.state_dict(shapes, seed)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in values.items()}, strict=False)
    integer = [k for k in missing if not state[k].is_floating_point()]
    assert not unexpected and sorted(missing) == sorted(integer), (missing, unexpected)
    model.eval()
    return shapes


def _write(name: str, record: dict, arrays: dict) -> None:
    config = record.get("config", {})
    if "_use_default_values" in config:  # a set: its order changes from run to run
        config["_use_default_values"] = sorted(config["_use_default_values"])
    record["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__}
    (DATA / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(DATA / f"{name}.npz",
                        **{k: np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f"
                                         else np.int64) for k, v in arrays.items()})


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def ddim_reference() -> None:
    """Timesteps, step means and standard deviations of diffusers' DDIMScheduler."""
    rng = np.random.default_rng(7)
    arrays, record = {}, {"settings": SCHEDULERS, "etas": DDIM_ETAS, "steps": DDIM_STEPS}
    for name, settings in SCHEDULERS.items():
        scheduler = diffusers.DDIMScheduler(**settings)
        sample = torch.ones(1)
        noise = torch.from_numpy(rng.standard_normal((3, 2, 4, 4)).astype(np.float32))
        x0 = torch.from_numpy(rng.standard_normal((3, 2, 4, 4)).astype(np.float32))
        t = torch.tensor([0, 500, 999])
        arrays[f"{name}/add_noise"] = _np(scheduler.add_noise(x0, noise, t))
        arrays[f"{name}/add_noise_inputs"] = np.stack([_np(x0), _np(noise)])
        for steps in DDIM_STEPS:
            scheduler.set_timesteps(steps)
            timesteps = scheduler.timesteps.numpy()
            arrays[f"{name}/{steps}/timesteps"] = timesteps
            for eta in DDIM_ETAS:
                key = f"{name}/{steps}/{eta}"
                indices = [0, 1, steps // 2, steps - 1]
                x = rng.standard_normal((len(indices), 2, 3, 4, 4)).astype(np.float32)
                out = rng.standard_normal(x.shape).astype(np.float32)
                means, stds = [], []
                for row, i in enumerate(indices):
                    t = int(timesteps[i])
                    sample = torch.from_numpy(x[row])
                    mean = scheduler.step(torch.from_numpy(out[row]), t, sample, eta=eta,
                                          variance_noise=torch.zeros_like(sample)).prev_sample
                    prev_t = t - scheduler.config.num_train_timesteps // steps
                    means.append(_np(mean))
                    stds.append(eta * float(scheduler._get_variance(t, prev_t)) ** 0.5)
                arrays[f"{key}/indices"] = np.asarray(indices)
                arrays[f"{key}/x"], arrays[f"{key}/model_output"] = x, out
                arrays[f"{key}/mean"], arrays[f"{key}/std"] = np.stack(means), np.asarray(stds)
    _write("ddim", record, arrays)


FLOW_SCHEDULERS = {
    # Stable Diffusion 3 / 3.5: a fixed shift of 3.
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    # FLUX-style resolution-dependent shifting (exponential), and the linear variant.
    "dynamic": dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "dynamic_linear": dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                           time_shift_type="linear"),
}
FLOW_STEPS = (1, 5, 28)
FLOW_SEQ_LEN = 1024  # latent tokens of the dynamic cases (a 512x512 FLUX image)


def flow_reference() -> None:
    """Sigmas, timesteps and Euler steps of diffusers' FlowMatchEulerDiscreteScheduler; mu
    from the FLUX pipeline's ``calculate_shift``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    rng = np.random.default_rng(11)
    arrays, record = {}, {"settings": FLOW_SCHEDULERS, "steps": FLOW_STEPS,
                          "seq_len": FLOW_SEQ_LEN}
    for name, settings in FLOW_SCHEDULERS.items():
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**settings)
        mu = None
        if settings.get("use_dynamic_shifting"):
            mu = calculate_shift(FLOW_SEQ_LEN, settings["base_image_seq_len"],
                                 settings["max_image_seq_len"], settings["base_shift"],
                                 settings["max_shift"])
            arrays[f"{name}/mu"] = np.asarray(mu, np.float64)
        for steps in FLOW_STEPS:
            scheduler.set_timesteps(steps, mu=mu)
            key = f"{name}/{steps}"
            arrays[f"{key}/sigmas"] = _np(scheduler.sigmas)
            arrays[f"{key}/timesteps"] = _np(scheduler.timesteps)
            x = rng.standard_normal((steps, 2, 3, 4, 4)).astype(np.float32)
            out = rng.standard_normal(x.shape).astype(np.float32)
            prev = []
            for i, t in enumerate(scheduler.timesteps):
                scheduler._step_index = i
                prev.append(_np(scheduler.step(torch.from_numpy(out[i]), t,
                                               torch.from_numpy(x[i])).prev_sample))
            arrays[f"{key}/x"], arrays[f"{key}/model_output"] = x, out
            arrays[f"{key}/prev_sample"] = np.stack(prev)
    _write("flow", record, arrays)


def tokenizer_reference() -> None:
    """transformers' CLIPTokenizer on the shapes world's vocabulary."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(SHAPES_TOKENIZER),
                                                           model_max_length=16)
    ids = tokenizer(TOKENIZER_TEXTS, padding="max_length", max_length=16, truncation=True,
                    return_tensors="np").input_ids
    full = tokenizer(TOKENIZER_TEXTS, truncation=False).input_ids
    _write("tokenizer", {"texts": TOKENIZER_TEXTS, "full_ids": full,
                         "decoded": [tokenizer.decode(row, skip_special_tokens=True)
                                     for row in full]},
           {"ids": ids})


T5_BASE = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=100,
               relative_attention_num_buckets=32, relative_attention_max_distance=128)
T5_CASES = {
    # T5 v1.1 (SD3's text_encoder_3): gated GELU, tanh approximation.
    "t5_gated_gelu": dict(T5_BASE, feed_forward_proj="gated-gelu"),
    # The original T5: ReLU; attention narrower than d_model; few buckets, the last ones
    # (distance >= 20) reached within the text.
    "t5_relu": dict(T5_BASE, feed_forward_proj="relu", d_kv=6, num_layers=3,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20),
}
T5_LENGTH, T5_TEXT_LENGTHS = 24, (8, 21)  # tokens per row; real tokens (with </s>) when padded
#: The tiny T5 tokenizer's training text and the texts it is checked on (truncated to 16).
T5_TOKENIZER_CORPUS = ["a red circle on a blue background", "two green squares left of a circle",
                       "three pink hexagons above the yellow triangle",
                       "a small purple star next to an orange square",
                       "the big blue circle is right of the red hexagon"] * 4
T5_TOKENIZER_TEXTS = TOKENIZER_TEXTS + ["  leading and   trailing spaces ", "tab\tand\nnewline",
                                        "ends with </s> inside"]
T5_TOKENIZER_FILES = DATA / "t5_tokenizer_files"


def _t5_tokenizer_files() -> None:
    """A Unigram tokenizer in T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; whitespace
    split and ``▁`` word starts; ``</s>`` appended), trained on ``T5_TOKENIZER_CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(T5_TOKENIZER_CORPUS, trainer)
    # the same file on every run: pieces of equal (rounded) score in a fixed order
    vocab = [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]
    pieces = sorted(((piece, round(score, 6)) for piece, score in vocab[3:]),
                    key=lambda entry: (-entry[1], entry[0]))
    tokenizer.model = models.Unigram(vocab[:3] + pieces, unk_id=2, byte_fallback=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    T5_TOKENIZER_FILES.mkdir(exist_ok=True)
    tokenizer.save(str(T5_TOKENIZER_FILES / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = dict(special, tokenizer_class="T5Tokenizer", extra_ids=0, model_max_length=16)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (T5_TOKENIZER_FILES / name).write_text(json.dumps(content, indent=1) + "\n")


@torch.no_grad()
def t5_reference() -> None:
    """transformers' T5EncoderModel (last hidden state, with and without padding and mask),
    its relative position buckets, and its T5 tokenizer on a tiny Unigram vocabulary."""
    rng = np.random.default_rng(5678)
    ids = rng.integers(2, 100, (2, T5_LENGTH))
    ids[:, -1] = 1  # </s>
    lengths = np.array(T5_TEXT_LENGTHS)[:, None]
    positions = np.arange(T5_LENGTH)[None]
    padded = np.where(positions < lengths - 1, ids, np.where(positions == lengths - 1, 1, 0))
    mask = (positions < lengths).astype(np.int64)
    relative = np.arange(-600, 601)
    for name, config in T5_CASES.items():
        model = transformers.T5EncoderModel(transformers.T5Config(**config))
        state = model.state_dict()
        shapes = {k: list(v.shape) for k, v in state.items()
                  if v.is_floating_point() and k != "encoder.embed_tokens.weight"}  # tied
        missing, unexpected = model.load_state_dict(
            {k: torch.from_numpy(v) for k, v in weights.state_dict(shapes, 7).items()},
            strict=False)
        assert not unexpected and missing == ["encoder.embed_tokens.weight"], missing
        assert model.encoder.embed_tokens.weight is model.shared.weight
        model.eval()
        run = lambda i, m=None: model(  # noqa: E731
            input_ids=torch.from_numpy(i),
            attention_mask=None if m is None else torch.from_numpy(m)).last_hidden_state
        out, masked, unmasked = run(ids), run(padded, mask), run(padded)
        model.set_attn_implementation("eager")  # the default (sdpa) agrees with eager
        np.testing.assert_allclose(_np(run(padded, mask)), _np(masked), atol=1e-5)
        attention = model.encoder.block[0].layer[0].SelfAttention
        buckets = attention._relative_position_bucket(
            torch.from_numpy(relative), bidirectional=True,
            num_buckets=config["relative_attention_num_buckets"],
            max_distance=config["relative_attention_max_distance"])
        record = {"class": "T5EncoderModel", "config": model.config.to_dict(),
                  "shapes": shapes, "seed": 7}
        model.to(torch.bfloat16)  # how far transformers' own bfloat16 run is from float32
        record["bfloat16_error"] = max(
            float(np.abs(_np(low) - _np(want)).max() / max(1.0, np.abs(_np(want)).max()))
            for low, want in zip((run(ids), run(padded, mask), run(padded)),
                                 (out, masked, unmasked)))
        _write(name, record,
               dict(input_ids=ids, last_hidden_state=_np(out), padded_ids=padded,
                    attention_mask=mask, masked_last_hidden_state=_np(masked),
                    unmasked_last_hidden_state=_np(unmasked), relative_position=relative,
                    buckets=buckets.numpy()))
    _t5_tokenizer_files()
    tokenizer = transformers.T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_FILES))
    encoded = tokenizer(T5_TOKENIZER_TEXTS, padding="max_length", max_length=16,
                        truncation=True, return_tensors="np")
    full = tokenizer(T5_TOKENIZER_TEXTS).input_ids
    _write("t5_tokenizer", {"texts": T5_TOKENIZER_TEXTS, "full_ids": full,
                            "tokens": [tokenizer.tokenize(t) for t in T5_TOKENIZER_TEXTS],
                            "decoded": [tokenizer.decode(row, skip_special_tokens=True)
                                        for row in full]},
           {"ids": encoded.input_ids, "attention_mask": encoded.attention_mask})


def _import_open_clip():
    """open_clip's model code. Its image transforms import torchvision, whose wheels here do
    not match the CPU torch; they are not used, so torchvision is stood in for by an empty
    module (transformers is imported first: it looks torchvision up itself)."""
    import types

    class _Any(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any(name, (), {"__init__": lambda self, *a, **k: None})

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.ops", "torchvision.ops.misc"):
        if name not in sys.modules:
            sys.modules[name] = _Module(name)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, sys.modules[name])
    import open_clip

    return open_clip


def open_clip_reference() -> None:
    """open_clip's CLIP (the HPS v2.1 architecture, tiny): normalised features."""
    open_clip = _import_open_clip()
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = OPEN_CLIP_CONFIG
    model = CLIP(embed_dim=config["embed_dim"], vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**config["text_cfg"]))
    shapes = _load(model, seed=5)
    rng = np.random.default_rng(99)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    ids = np.zeros((2, 12), np.int64)  # open_clip pads with 0; 98 (the largest id) ends a text
    ids[0, :5] = [97, 7, 9, 40, 98]
    ids[1, :9] = [97, 4, 5, 8, 8, 8, 60, 3, 98]
    image = model.encode_image(torch.from_numpy(pixels), normalize=True)
    text = model.encode_text(torch.from_numpy(ids), normalize=True)
    _write("open_clip", {"class": "open_clip.model.CLIP", "config": config, "shapes": shapes,
                         "seed": 5, "open_clip": open_clip.__version__},
           dict(pixel_values=pixels, input_ids=ids, image_features=_np(image),
                text_features=_np(text)))


MMDIT_BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                  pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16)
MMDIT_CASES = {
    # SD 3: joint attention only, no query/key norm.
    "mmdit_sd3": MMDIT_BASE,
    # SD 3.5 Medium (MMDiT-X): RMS query/key norm, an extra image self-attention in block 0.
    "mmdit_sd35": dict(MMDIT_BASE, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
}
#: Latent sizes: sample_size itself and a non-square one, both centre crops of the 16 x 16
#: position grid (pos_embed_max_size patches).
MMDIT_SAMPLES = {"square": (8, 8), "wide": (6, 10)}


@torch.no_grad()
def mmdit_reference() -> None:
    """diffusers' SD3Transformer2DModel. Its position table is a persistent buffer: kept as
    diffusers computes it (out of ``shapes``, so the tests do not draw it at random) and
    stored as ``pos_embed``."""
    rng = np.random.default_rng(4321)
    for name, config in MMDIT_CASES.items():
        model = diffusers.SD3Transformer2DModel(**config)
        table = model.pos_embed.pos_embed.clone()
        shapes = _load(model, seed=6)
        model.pos_embed.pos_embed.copy_(table)
        shapes.pop("pos_embed.pos_embed")
        arrays = {"pos_embed": _np(table), "timestep": np.array([500.5, 3.25], np.float32),
                  "encoder_hidden_states": rng.standard_normal((2, 5, 24)).astype(np.float32),
                  "pooled_projections": rng.standard_normal((2, 12)).astype(np.float32)}
        for sample, (height, width) in MMDIT_SAMPLES.items():
            latents = rng.standard_normal((2, 4, height, width)).astype(np.float32)
            out = model(torch.from_numpy(latents),
                        torch.from_numpy(arrays["encoder_hidden_states"]),
                        torch.from_numpy(arrays["pooled_projections"]),
                        torch.from_numpy(arrays["timestep"])).sample
            arrays[f"{sample}/hidden_states"], arrays[f"{sample}/out"] = latents, _np(out)
        _write(name, {"class": "SD3Transformer2DModel", "config": dict(model.config),
                      "shapes": shapes, "seed": 6, "samples": MMDIT_SAMPLES}, arrays)


@torch.no_grad()
def main() -> None:
    DATA.mkdir(exist_ok=True)
    open_clip_reference()
    ddim_reference()
    flow_reference()
    tokenizer_reference()
    mmdit_reference()
    t5_reference()
    rng = np.random.default_rng(1234)
    for name, config in UNET_CASES.items():
        model = diffusers.UNet2DConditionModel(**config)
        shapes = _load(model, seed=1)
        sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        timesteps = np.array([3.0, 741.0], np.float32)
        context = rng.standard_normal((2, 5, 32)).astype(np.float32)
        arrays = dict(sample=sample, timesteps=timesteps, context=context)
        kwargs = {}
        if config.get("addition_embed_type"):
            arrays["text_embeds"] = rng.standard_normal((2, 24)).astype(np.float32)
            arrays["time_ids"] = np.array([[8, 8, 0, 0, 8, 8], [16, 8, 2, 1, 8, 8]], np.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(arrays["text_embeds"]),
                                           "time_ids": torch.from_numpy(arrays["time_ids"])}
        out = model(torch.from_numpy(sample), torch.from_numpy(timesteps),
                    torch.from_numpy(context), **kwargs).sample
        _write(name, {"class": "UNet2DConditionModel", "config": dict(model.config),
                      "shapes": shapes, "seed": 1}, dict(arrays, out=_np(out)))
    for name, config in VAE_CASES.items():
        model = diffusers.AutoencoderKL(**config)
        shapes = _load(model, seed=2)
        images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
        posterior = model.encode(torch.from_numpy(images)).latent_dist
        latents = rng.standard_normal(tuple(posterior.mean.shape)).astype(np.float32)
        decoded = model.decode(torch.from_numpy(latents)).sample
        _write(name, {"class": "AutoencoderKL", "config": dict(model.config), "shapes": shapes,
                      "seed": 2},
               dict(images=images, mean=_np(posterior.mean), logvar=_np(posterior.logvar),
                    latents=latents, decoded=_np(decoded)))
    ids = np.array([[49 % 99, 7, 9, 98, 1, 1, 1, 1, 1, 1, 1, 1],
                    [3, 4, 5, 8, 8, 8, 97, 60, 98, 1, 1, 1]], np.int64)
    mask = (np.arange(12)[None] <= np.array([[3], [8]])).astype(np.int64)
    for name, config in CLIP_CASES.items():
        model = transformers.CLIPModel(transformers.CLIPConfig(**config))
        shapes = _load(model, seed=3)
        pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        text = model.get_text_features(input_ids=torch.from_numpy(ids))
        masked = model.get_text_features(input_ids=torch.from_numpy(ids),
                                         attention_mask=torch.from_numpy(mask))
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        text, masked, image = (getattr(t, "pooler_output", t) for t in (text, masked, image))
        _write(name, {"class": "CLIPModel", "config": model.config.to_dict(), "shapes": shapes,
                      "seed": 3},
               dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                    text_features=_np(text), masked_text_features=_np(masked),
                    image_features=_np(image), logit_scale=_np(model.logit_scale)))
    model = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT_PROJECTION_CASE))
    shapes = _load(model, seed=4)
    out = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    _write("clip_text_projection", {"class": "CLIPTextModelWithProjection",
                                    "config": model.config.to_dict(), "shapes": shapes,
                                    "seed": 4},
           dict(input_ids=ids, last_hidden_state=_np(out.last_hidden_state),
                penultimate=_np(out.hidden_states[-2]), text_embeds=_np(out.text_embeds)))


if __name__ == "__main__":
    main()
