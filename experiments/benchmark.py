"""Speed and memory of VARD in JAX, side by side with the same work in PyTorch (issue 8).

    PYTHONPATH=. .venv/bin/python experiments/benchmark.py [--model=shapes|sd15] [--batch=16]
        [--steps=10] [--repeats=5] [--sections=all|sample,policy,value,memory,unet,epoch]
        [--memory_steps=10,20,50] [--no_torch] [--torch_threads=N] [--dtype=D] [--smoke]
        [--cpu_devices=N] [--out=FILE]

Prints one JSON object (and writes it to ``--out``); progress lines go to stderr.

What is measured (``docs/BENCHMARKS.md`` has the figures):

* ``sample``: images/s of ``Trainer.sample`` (text encoding, the classifier-free-guided DDIM
  scan, decoding), after compilation; compile seconds separately.
* ``policy`` / ``value``: seconds per ``Trainer.policy_step`` (VARD, K = 1, every step
  trained) and ``Trainer.value_step``, median of ``--repeats`` runs after compilation. The
  Trainer is built from ``configs/shapes.py`` with overrides, so the measured functions *are*
  the project's jitted steps (``jit(...).lower(...).compile()``, then the executable is
  called; the state is donated as in training).
* ``memory``: XLA's ``memory_analysis()`` of the compiled policy step for each T of
  ``--memory_steps``, K = 1 vs. K = T, remat none vs. full, with ``policy.scan_unroll = 1`` (a
  loop; on CPU the project unrolls the differentiated scan fully, which changes the figures:
  the timed configuration's own figure is reported under ``policy``). Peak estimate = argument
  + output + temp - alias bytes.
* ``unet``: a bare jitted UNet forward and forward+backward (gradient of the parameters) at
  the batch the steps use (2B: the [null; cond] guidance batch), split over the devices as
  the steps' batches are.
* ``epoch``: one VARD epoch as ``configs/shapes.py`` runs it (``training.epochs.VardStage.epoch``:
  collect -> value_update -> policy_update: sampling, reward, value diagnostics, value
  updates, policy update), divided by the time of the bare UNet calls it needs: T forwards for
  sampling, and per policy update T reference forwards and T forward+backwards. The ratio is
  the ``overhead`` (1 = nothing but UNet work).
* ``torch``: the same sampling loop, VARD policy step (per-step backward, K = 1), value step
  and bare UNet calls in PyTorch with diffusers' ``UNet2DConditionModel`` of the identical
  configuration holding the *same weights* (``diffusers_export.torch_state_dict``), and a
  PyTorch twin of the conv value model with the value params copied; both are checked against
  the JAX outputs. JAX and PyTorch runs alternate (one of each per repeat) in this process, so
  that both see the same machine load; ratios are JAX time / PyTorch time. The text encoder is
  run once in JAX for the PyTorch loops (its cost is negligible here). Without torch the JSON
  says so and holds the JAX figures alone.

On a CPU-only machine the process gets the host devices a training run would
(``config.mesh.cpu_devices``: one per core that divides the batch; ``--cpu_devices=1`` for a
single device; vard_jax/parallel/host.py); ``environment.jax.devices`` lists them.

``--model=sd15`` is an SD-1.5-shaped UNet (random weights, 64x64x4 latents, 768-wide context
from a randomly initialised 12-layer CLIP text encoder of SD's shape, bfloat16 computation)
for GPU sessions; it has no VAE and no reward model, so the ``epoch`` section is skipped.
``--smoke`` runs everything on a tiny random UNet with T = 2, batch 2, one repeat (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.models.stable_diffusion import SD15_UNET_CONFIG

SECTIONS = ("sample", "policy", "value", "memory", "unet", "epoch")
MIB = 2.0**20

#: Stable Diffusion 1.5's UNet architecture (its ``unet/config.json``).
SD15_UNET = SD15_UNET_CONFIG
#: SD 1.5's text encoder (CLIP ViT-L/14's text tower), here with random weights.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)
#: SD 1.5's latent shape at 512x512 pixels.
SD15_LATENT = (4, 64, 64)
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                     clip_sample=False, prediction_type="epsilon")
#: ``--smoke``: a two-block UNet on the shapes world's 32x32x3 pixels (GroupNorm needs 32).
#: Attention only in the mid block (at 16x16).
TINY_UNET = dict(
    block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=4)

#: ``pretrained.family`` per benchmark model. ``benchmark_shapes`` is the project's ``shapes``
#: loader, memoised (the memory table builds one Trainer per configuration).
FAMILY = {"shapes": "benchmark_shapes", "sd15": "benchmark_sd15", "tiny": "benchmark_tiny"}


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[benchmark {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr,
          flush=True)


# --- model families for the benchmark ---------------------------------------------------------

def _register_families() -> None:
    """Loader families ``benchmark_sd15`` and ``benchmark_tiny`` (random weights)."""
    from vard_jax.models import loader, shapes as shapes_model
    from vard_jax.models.nn import clip as nn_clip, unet as nn_unet
    from vard_jax.diffusion.schedule import NoiseScheduleConfig

    if "benchmark_sd15" in loader._LOADERS:
        return
    cache: dict = {}

    def memoised(name, fn):
        def load(config):
            key = (name, config.pretrained.path, config.pretrained.dtype, config.train.seed)
            if key not in cache:
                cache[key] = fn(config)
            return cache[key]

        loader.register_family(name)(load)

    memoised("benchmark_shapes", loader._LOADERS["shapes"])

    def _tiny(config):
        loaded = loader._LOADERS["benchmark_shapes"](config)
        unet_config = dict(shapes_model.UNET_CONFIG, **TINY_UNET)
        unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(unet_config),
                                            dtype=config.pretrained.dtype)
        params = unet.init_params(jax.random.PRNGKey(config.train.seed),
                                  context_length=loaded.pipeline.max_length)
        pipeline = dataclasses.replace(loaded.pipeline, unet=unet)
        return loaded._replace(pipeline=pipeline, params=dict(loaded.params, unet=params))

    memoised("benchmark_tiny", _tiny)

    def _sd15(config):
        from vard_jax.worlds import tokenizer_files
        from vard_jax.models.pipeline import Pipeline

        dtype = config.pretrained.dtype
        tokenizer = tokenizer_files.load_tokenizer(shapes_model.ASSET_DIR / "tokenizer")
        text_config = nn_clip.CLIPTextConfig.from_dict(dict(
            SD15_TEXT, vocab_size=len(tokenizer), bos_token_id=int(tokenizer.bos_token_id),
            eos_token_id=int(tokenizer.eos_token_id), pad_token_id=int(tokenizer.pad_token_id)))
        text_encoder = nn_clip.CLIPTextModel(text_config, dtype=dtype)
        key_unet, key_text = jax.random.split(jax.random.PRNGKey(config.train.seed))
        max_length = SD15_TEXT["max_position_embeddings"]
        text_params = jax.jit(text_encoder.init_params, static_argnums=1)(key_text, max_length)
        unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(SD15_UNET), dtype=dtype)
        unet_params = jax.jit(lambda key: unet.init_params(key, context_length=max_length))(
            key_unet)
        pipeline = Pipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                            schedule=NoiseScheduleConfig(**SD15_SCHEDULE),
                            sample_shape=SD15_LATENT, max_length=max_length)
        params = {"unet": unet_params, "text_encoder": text_params}
        return loader.LoadedModel(pipeline, params)

    memoised("benchmark_sd15", _sd15)


def make_config(model: str, batch: int, steps: int, *, grad_depth: int = 1, remat: str = "",
                unroll: int = 0, value_batch: int = 0, value_updates: int = 0, dtype: str = ""):
    """``configs/shapes.py`` with the benchmark's overrides (K, T, batch, remat, unroll)."""
    from configs import shapes as shapes_config

    config = shapes_config.get_config()
    config.pretrained.family = FAMILY[model]
    if model == "sd15":
        config.pretrained.dtype = dtype or "bfloat16"
        config.pretrained.param_dtype = dtype or "bfloat16"
        config.reward.name = "jpeg_compressibility"  # never called: no epoch for sd15
        config.reward.eval_extra = ""
        config.policy.remat = remat or "full"
    else:
        config.pretrained.dtype = dtype or "float32"
        config.policy.remat = remat or config.policy.remat
    config.sample.batch_size = batch
    config.sample.num_steps = steps
    config.policy.grad_depth = grad_depth
    config.policy.train_fraction = 1.0
    config.policy.scan_unroll = unroll
    if value_batch:
        config.value.batch_size = value_batch
    if value_updates:
        config.value.updates_per_epoch = value_updates
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


# --- timing helpers ---------------------------------------------------------------------------

def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


class Timer:
    """Runs JAX and PyTorch callables alternately and keeps their durations."""

    def __init__(self, repeats: int):
        self.repeats = repeats

    def run(self, jobs: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(self.repeats):
            for name, job in jobs.items():
                start = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - start)
        return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


#: XLA options of the compiles: ``--smoke`` and the memory table skip LLVM's optimisations
#: (``xla_backend_optimization_level`` 0): the HLO passes and buffer assignment, hence the
#: memory figures, are the same; the compiles are shorter and the code slower.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_COMPILER_OPTIONS: Optional[dict] = None


def compile_timed(jitted: Callable, *args, options: Optional[dict] = None) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=options or _COMPILER_OPTIONS)
    return compiled, time.perf_counter() - start


def memory_figures(compiled: Any) -> dict:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"available": False}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    raw = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
    peak = (raw["argument_size_in_bytes"] + raw["output_size_in_bytes"]
            + raw["temp_size_in_bytes"] - raw["alias_size_in_bytes"])
    return {"peak_mib": peak / MIB, "temp_mib": raw["temp_size_in_bytes"] / MIB,
            "argument_mib": raw["argument_size_in_bytes"] / MIB, **raw}


# --- environment ------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> Optional[float]:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def environment(torch_module: Any) -> dict:
    env = {
        "loadavg_start": list(os.getloadavg()),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(),
                    "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(
                        os, "sched_getaffinity") else None,
                    "memory_gib": _memory_gib(), "python": platform.python_version()},
        "jax": {"version": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(
                    jax.lib, "__version__") else None,
                "backend": jax.default_backend(),
                "devices": [d.device_kind for d in jax.devices()],
                "default_matmul_precision": str(jax.config.jax_default_matmul_precision)},
        "threads": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS",
                                                   "MKL_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL")},
    }
    try:
        import jaxlib

        env["jax"]["jaxlib"] = jaxlib.__version__
    except (ImportError, AttributeError):
        pass
    for name in ("flax", "diffusers", "optax"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if torch_module is not None:
        env["torch"] = {"version": torch_module.__version__,
                        "num_threads": torch_module.get_num_threads(),
                        "num_interop_threads": torch_module.get_num_interop_threads(),
                        "cuda": torch_module.cuda.is_available() and
                        torch_module.cuda.get_device_name(0)}
        env["threads"]["torch_num_threads"] = torch_module.get_num_threads()
    return env


# --- the PyTorch twin -------------------------------------------------------------------------

def _torch_value_module(torch, sample_shape, context_dim: int, width: int, stages: int = 3):
    """A PyTorch twin of ``vard_jax.models.value.ConvValue`` (same layers, same math)."""
    nn, F = torch.nn, torch.nn.functional

    class TorchConvValue(nn.Module):
        def __init__(self):
            super().__init__()
            channels_in = sample_shape[0]
            self.width, self.stages = width, stages
            self.condition = nn.Linear(64 + context_dim, 4 * width)
            self.conv_in = nn.Conv2d(channels_in, width, 3, padding=1)
            self.convs, self.norms, self.films, self.convs2 = (nn.ModuleList() for _ in range(4))
            previous = width
            for stage in range(stages):
                channels = width * 2**stage
                self.convs.append(nn.Conv2d(previous, channels, 3, stride=2 if stage else 1,
                                            padding=0 if stage else 1))
                self.norms.append(nn.GroupNorm(min(8, channels), channels, eps=1e-6))
                self.films.append(nn.Linear(4 * width, 2 * channels))
                self.convs2.append(nn.Conv2d(channels, channels, 3, padding=1))
                previous = channels
            self.head = nn.Linear(previous + 4 * width, 4 * width)
            self.out = nn.Linear(4 * width, 1)

        def forward(self, x, timesteps, context):
            half = 32
            frequencies = torch.exp(-math.log(10_000.0) * torch.arange(
                half, device=x.device, dtype=torch.float32) / half)
            angles = timesteps.float()[:, None] * frequencies[None, :]
            embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
            condition = F.silu(self.condition(torch.cat([embedding, context.mean(1)], -1)))
            h = self.conv_in(x)
            for stage in range(self.stages):
                if stage:  # flax "SAME" with stride 2 pads (0, 1)
                    h = F.pad(h, (0, 1, 0, 1))
                h = self.norms[stage](self.convs[stage](h))
                scale, shift = self.films[stage](condition)[:, :, None, None].chunk(2, dim=1)
                h = F.silu(h * (1.0 + scale) + shift)
                h = F.silu(self.convs2[stage](h))
            h = F.silu(self.head(torch.cat([h.mean((2, 3)), condition], -1)))
            return self.out(h)[:, 0]

    return TorchConvValue()


def _torch_value_state(value_params: Any, stages: int = 3) -> dict:
    """ConvValue's flax params as the twin's state dict (flax names by creation order)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), value_params)

    def conv(name):
        return {"weight": p[name]["kernel"].transpose(3, 2, 0, 1), "bias": p[name]["bias"]}

    def dense(name):
        return {"weight": p[name]["kernel"].T, "bias": p[name]["bias"]}

    state = {}

    def add(prefix, tensors):
        for k, v in tensors.items():
            state[f"{prefix}.{k}"] = np.ascontiguousarray(v)

    add("condition", dense("Dense_0"))
    add("conv_in", conv("Conv_0"))
    for s in range(stages):
        add(f"convs.{s}", conv(f"Conv_{1 + 2 * s}"))
        add(f"norms.{s}", {"weight": p[f"GroupNorm_{s}"]["scale"],
                           "bias": p[f"GroupNorm_{s}"]["bias"]})
        add(f"films.{s}", dense(f"Dense_{1 + s}"))
        add(f"convs2.{s}", conv(f"Conv_{2 + 2 * s}"))
    add("head", dense(f"Dense_{stages + 1}"))
    add("out", dense(f"Dense_{stages + 2}"))
    return state


class TorchTwin:
    """The benchmark's work in PyTorch: same UNet weights, same value weights, same batch."""

    def __init__(self, torch, trainer, state, unet_config: dict, ids: Any, batch: int,
                 value_batch: int, seed: int = 0):
        from vard_jax.models import diffusers_export

        self.torch = torch
        diffusers = __import__("diffusers")
        config = trainer.config
        self.device = torch.device("cuda" if jax.default_backend() == "gpu"
                                   and torch.cuda.is_available() else "cpu")
        self.autocast_dtype = (torch.bfloat16 if config.pretrained.dtype == "bfloat16"
                               else None)
        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_config.items()}
        # A project-only field (docs/MODELS.md): GEGLU gates with tanh-approximated GELU, as
        # the shipped shapes UNet was trained; diffusers' GEGLU gets the same function.
        tanh_gelu = fields.pop("geglu_approximate", False)
        state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in
                      diffusers_export.torch_state_dict(
                          jax.device_get(trainer.reference_params)).items()}

        def unet():
            module = diffusers.UNet2DConditionModel(**fields)
            module.load_state_dict(state_dict, strict=True)
            if tanh_gelu:
                for layer in module.modules():
                    if type(layer).__name__ == "GEGLU":
                        layer.gelu = lambda gate: torch.nn.functional.gelu(gate,
                                                                           approximate="tanh")
            return module.to(self.device)

        self.policy = unet().train()
        self.reference = unet().eval().requires_grad_(False)
        pipeline = trainer.pipeline
        self.sample_shape = pipeline.sample_shape
        self.value = _torch_value_module(torch, pipeline.sample_shape,
                                         unet_config["cross_attention_dim"],
                                         config.value.width).to(self.device)
        self.value.load_state_dict({k: torch.from_numpy(v) for k, v in _torch_value_state(
            jax.device_get(state.value_params)).items()}, strict=True)
        self.value_frozen = _torch_value_module(torch, pipeline.sample_shape,
                                                unet_config["cross_attention_dim"],
                                                config.value.width).to(self.device)
        self.value_frozen.load_state_dict(self.value.state_dict())
        self.value_frozen.requires_grad_(False)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(),
                                           lr=config.policy.learning_rate)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=config.value.learning_rate)
        self.policy_clip, self.value_clip = config.policy.grad_clip, config.value.grad_clip
        sched = trainer.schedule
        self.timesteps = [int(t) for t in np.asarray(sched.timesteps)]
        self.prev_timesteps = [int(t) for t in np.asarray(sched.prev_timesteps)]
        self.alpha_t = [float(a) for a in np.asarray(sched.alpha_t)]
        self.alpha_prev = [float(a) for a in np.asarray(sched.alpha_prev)]
        self.eta, self.w = config.sample.eta, config.sample.guidance_scale
        self.beta = config.policy.beta
        self.steps = trainer.num_steps
        self.batch, self.value_batch = batch, value_batch
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        context = np.asarray(trainer.encode(ids), np.float32)
        null = np.asarray(trainer.encode(trainer.null_ids), np.float32)
        self.context = torch.from_numpy(context).to(self.device)
        self.null_context = torch.from_numpy(np.broadcast_to(null, context.shape).copy()).to(
            self.device)
        self.both_context = torch.cat([self.null_context, self.context])

    def _autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _randn(self, *shape):
        return self.torch.randn(*shape, generator=self.generator).to(self.device)

    def _unet(self, module, x, t, context):
        timesteps = self.torch.full((x.shape[0],), t, dtype=self.torch.long, device=self.device)
        with self._autocast():
            return module(x, timesteps, encoder_hidden_states=context).sample.float()

    def guided(self, module, x, t):
        both = self._unet(module, self.torch.cat([x, x]), t, self.both_context)
        eps_null, eps_cond = both.chunk(2)
        return eps_null + self.w * (eps_cond - eps_null)

    def ddim(self, i, x, eps, z):
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        std = self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - std**2, 0.0)) * eps
        return mean + std * z, mean, std

    # -- the timed work --
    def sample(self):
        torch = self.torch
        with torch.inference_mode():
            x = self._randn(self.batch, *self.sample_shape)
            noise = self._randn(self.batch, self.steps, *self.sample_shape)
            states, log_probs = [], []
            for i, t in enumerate(self.timesteps):
                eps = self.guided(self.policy, x, t)
                x_prev, mean, std = self.ddim(i, x, eps, noise[:, i])
                if std > 0:
                    log_probs.append((-((x_prev - mean) ** 2) / (2 * std**2) - math.log(std)
                                      - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1))
                states.append(x_prev)
                x = x_prev
            images = ((x.permute(0, 2, 3, 1) + 1.0) / 2.0).clamp(0.0, 1.0)
            torch.stack(states, 1)
            self._sync()
            return images

    def policy_step(self):
        """VARD, K = 1: per step, the policy's guided eps with gradient, the reference's without,
        V(x_{i-1}) - beta D_i; one backward per step (the graph of step i is freed at once)."""
        torch = self.torch
        self.policy_opt.zero_grad(set_to_none=True)
        x = self._randn(self.batch, *self.sample_shape)
        noise = self._randn(self.batch, self.steps, *self.sample_shape)
        for i, t in enumerate(self.timesteps):
            x = x.detach()
            eps = self.guided(self.policy, x, t)
            with torch.no_grad():
                eps_ref = self.guided(self.reference, x, t)
            x_prev, _, _ = self.ddim(i, x, eps, noise[:, i])
            prev_t = torch.full((self.batch,), self.prev_timesteps[i], device=self.device)
            value = self.value_frozen(x_prev, prev_t, self.context).mean()
            distance = ((eps - eps_ref) ** 2).mean()
            (-(value - self.beta * distance) / self.steps).backward()
            x = x_prev
        if self.policy_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.policy_clip)
        self.policy_opt.step()
        self._sync()

    def value_step(self, states, timesteps, context, targets):
        torch = self.torch
        self.value_opt.zero_grad(set_to_none=True)
        loss = ((self.value(states, timesteps, context) - targets) ** 2).mean()
        loss.backward()
        if self.value_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.value_clip)
        self.value_opt.step()
        self._sync()

    def unet_forward(self, x, t, context):
        with self.torch.inference_mode():
            out = self._unet(self.reference, x, t, context)
        self._sync()
        return out

    def unet_forward_backward(self, x, t, context, cotangent):
        self.policy.zero_grad(set_to_none=True)
        (self._unet(self.policy, x, t, context) * cotangent).sum().backward()
        self._sync()


# --- the benchmark ----------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("shapes", "sd15"), default="shapes")
    parser.add_argument("--batch", type=int, default=0, help="images per batch (16 shapes, 4 sd15)")
    parser.add_argument("--steps", type=int, default=0,
                        help="denoising steps T (10 shapes, 50 sd15)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per figure (5)")
    parser.add_argument("--sections", default="all",
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--memory_steps", default="", help="T values of the memory table")
    parser.add_argument("--dtype", default="", help="computation dtype (float32 shapes, "
                                                    "bfloat16 sd15)")
    parser.add_argument("--no_torch", action="store_true", help="JAX figures only")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads (0 = PyTorch's default); on a CPU shared "
                             "with other jobs, PyTorch's OpenMP pool is far slower with 2 "
                             "threads than with 1 (docs/BENCHMARKS.md)")
    parser.add_argument("--cpu_devices", type=int, default=0,
                        help="XLA host devices on a CPU-only machine, as config.mesh.cpu_devices "
                             "(0 = what training uses: the cores that divide the batch; 1 = one "
                             "device); XLA_FLAGS naming a count wins")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny UNet, T = 2, batch 2, one repeat (seconds)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    return parser.parse_args(argv)


def _import_torch(disabled: bool) -> tuple[Any, Optional[str]]:
    if disabled:
        return None, "disabled (--no_torch)"
    try:
        import torch
        import diffusers  # noqa: F401  (the PyTorch classes)

        diffusers.UNet2DConditionModel  # noqa: B018
    except (ImportError, AttributeError) as error:
        return None, f"PyTorch is not installed ({error}); pip install -e '.[bench]'"
    return torch, None


def _ratio(jax_s: float, torch_s: Optional[float]) -> Optional[float]:
    return None if not torch_s else jax_s / torch_s


def time_against_torch(timer: Timer, name: str, jax_job: Callable[[], Any],
                       torch_job: Optional[Callable[[], Any]]) -> dict:
    """Warms each job up with one call, times them alternately: the JAX (and PyTorch)
    summaries and their ratio, the section entries of the sample, value and policy steps."""
    jobs = {"jax": jax_job}
    if torch_job is not None:
        jobs["torch"] = torch_job
    for job in jobs.values():
        job()
    log(f"{name}: timing")
    times = timer.run(jobs)
    section = {"jax": summary(times["jax"])}
    if torch_job is not None:
        section["torch"] = summary(times["torch"])
        section["ratio"] = _ratio(section["jax"]["median_s"], section["torch"]["median_s"])
    return section


def run(args: argparse.Namespace) -> dict:
    from vard_jax.training.trainer import Trainer
    from vard_jax.models import shapes as shapes_model
    from vard_jax import prompts as prompts_lib
    from vard_jax.parallel import host
    from vard_jax.parallel import mesh as mesh_lib

    global _COMPILER_OPTIONS
    _COMPILER_OPTIONS = FAST_COMPILE if args.smoke else None
    _register_families()
    model = "tiny" if args.smoke and args.model == "shapes" else args.model
    defaults = {"shapes": (16, 10, 5), "tiny": (2, 2, 1), "sd15": (4, 50, 5)}[model]
    if args.smoke:
        defaults = (2, 2, 1)
    batch = args.batch or defaults[0]
    steps = args.steps or defaults[1]
    repeats = args.repeats or defaults[2]
    sections = SECTIONS if args.sections == "all" else tuple(
        s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; use {','.join(SECTIONS)}")
    if args.memory_steps:
        memory_steps = [int(s) for s in args.memory_steps.split(",")]
    else:
        memory_steps = [steps] if args.smoke else [10, 20, 50]
    value_batch = batch * steps if args.smoke else 0
    value_updates = 2 if args.smoke else 0
    torch, torch_missing = _import_torch(args.no_torch)
    if torch is not None and args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if torch is not None:
        # On a GPU, JAX would otherwise reserve 75 % of its memory at start, and the PyTorch
        # twin in this process would run out of memory on an SD-1.5-sized UNet; the memory
        # section reads XLA's compile-time analysis, which this does not change.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if torch is None and not args.no_torch and args.smoke:
        log(f"smoke: {torch_missing}; JAX figures only")

    config = make_config(model, batch, steps, value_batch=value_batch,
                         value_updates=value_updates, dtype=args.dtype)
    config.mesh.cpu_devices = args.cpu_devices
    host.configure(config)  # before the first device call: environment() starts the backend
    result: dict = {"model": args.model, "unet": model,
                    "compiler_options": _COMPILER_OPTIONS, "batch": batch, "steps": steps,
                    "repeats": repeats, "smoke": bool(args.smoke), "sections": list(sections),
                    "environment": environment(torch)}
    result["torch"] = {"available": torch is not None, "reason": torch_missing}
    unet_config = {"shapes": shapes_model.UNET_CONFIG, "sd15": SD15_UNET,
                   "tiny": dict(shapes_model.UNET_CONFIG, **TINY_UNET)}[model]

    log(f"model {model}, batch {batch}, T {steps}, repeats {repeats}, sections {sections}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
    start = time.perf_counter()
    trainer = Trainer(config)
    log("trainer built")
    result["trainer_build_s"] = time.perf_counter() - start
    result["config"] = {"grad_depth": config.policy.grad_depth, "remat": config.policy.remat,
                        "scan_unroll": str(trainer.loss_config.unroll),
                        "guidance_scale": config.sample.guidance_scale,
                        "eta": config.sample.eta, "value_batch": config.value.batch_size,
                        "value_updates_per_epoch": config.value.updates_per_epoch,
                        "dtype": config.pretrained.dtype,
                        "unet_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(
                            trainer.reference_params)))}
    # Trainer.init_state's computation, jitted (one compile instead of many eager ones).
    state = mesh_lib.put(jax.jit(trainer.init_state_abstract)(),
                         trainer.state_shardings(trainer.abstract_state))
    log("state initialised")
    frozen, reference = trainer.frozen, trainer.reference_params
    train_prompts = prompts_lib.load_prompts(config.sample.train_prompts)
    prompts = prompts_lib.draw(train_prompts, batch, config.train.seed, 99)
    ids = trainer.put_batch(jnp.asarray(trainer.pipeline.tokenize(prompts)))
    key = jax.random.PRNGKey(0)

    twin = None
    if torch is not None and any(s in sections for s in ("sample", "policy", "value", "unet")):
        log("torch: building the twin")
        start = time.perf_counter()
        twin = TorchTwin(torch, trainer, state, unet_config, ids, batch,
                         config.value.batch_size)
        result["torch"]["build_s"] = time.perf_counter() - start
        result["torch"]["device"] = str(twin.device)
    timer = Timer(repeats)
    c, h, w = trainer.pipeline.sample_shape

    # ---- the bare UNet (also the check that the PyTorch twin is the same model) ----
    n2 = 2 * batch
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n2, c, h, w)).astype(np.float32)
    t_np = np.full((n2,), int(np.asarray(trainer.schedule.timesteps)[0]), np.int32)
    cond_context = trainer.encode(ids)
    null_context = jnp.broadcast_to(trainer.encode(trainer.null_ids), cond_context.shape)
    ctx_np = np.asarray(jnp.concatenate([null_context, cond_context]), np.float32)
    g_np = rng.standard_normal((n2, c, h, w)).astype(np.float32)
    compiled = {}
    if "unet" in sections or "epoch" in sections:
        pipeline = trainer.pipeline
        policy_params = trainer.pretrained_policy_params()
        # Split over the data axis like the Trainer's batches (all devices, as in training).
        x_j, t_j, ctx_j, g_j = (trainer.put_batch(jnp.asarray(a))
                                for a in (x_np, t_np, ctx_np, g_np))
        fwd = jax.jit(lambda p, x, t, ctx: pipeline.eps_fn(p, x, t, ctx))

        def fwd_bwd_fn(p, x, t, ctx, g):
            return jax.grad(lambda q: jnp.sum(pipeline.eps_fn(q, x, t, ctx) * g))(p)

        fwd_bwd = jax.jit(fwd_bwd_fn)
        log("unet: compiling")
        fwd_c, fwd_compile = compile_timed(fwd, reference, x_j, t_j, ctx_j)
        fb_c, fb_compile = compile_timed(fwd_bwd, policy_params, x_j, t_j, ctx_j, g_j)
        jobs = {"jax_forward": lambda: _block(fwd_c(reference, x_j, t_j, ctx_j)),
                "jax_forward_backward": lambda: _block(fb_c(policy_params, x_j, t_j, ctx_j, g_j))}
        section = {"batch": n2, "compile_forward_s": fwd_compile,
                   "compile_forward_backward_s": fb_compile}
        if twin is not None:
            dev = twin.device
            x_t, ctx_t, g_t = (torch.from_numpy(a).to(dev) for a in (x_np, ctx_np, g_np))
            t0 = int(t_np[0])
            jax_out = np.asarray(fwd_c(reference, x_j, t_j, ctx_j))
            torch_out = twin.unet_forward(x_t, t0, ctx_t).cpu().numpy()
            section["torch_max_abs_diff"] = float(np.max(np.abs(jax_out - torch_out)))
            section["output_max_abs"] = float(np.max(np.abs(jax_out)))
            jobs["torch_forward"] = lambda: twin.unet_forward(x_t, t0, ctx_t)
            jobs["torch_forward_backward"] = lambda: twin.unet_forward_backward(x_t, t0, ctx_t,
                                                                                g_t)
            for job in jobs.values():  # warm-up (PyTorch allocators, oneDNN primitives)
                job()
        log("unet: timing forward and forward+backward")
        times = timer.run(jobs)
        for name, values in times.items():
            section[name] = summary(values)
        if twin is not None:
            section["ratio_forward"] = _ratio(section["jax_forward"]["median_s"],
                                              section["torch_forward"]["median_s"])
            section["ratio_forward_backward"] = _ratio(
                section["jax_forward_backward"]["median_s"],
                section["torch_forward_backward"]["median_s"])
        result["unet"] = section

    # ---- sampling ----
    if "sample" in sections or "epoch" in sections:
        policy_params = state.policy_params
        log("sample: compiling")
        sample_c, sample_compile = compile_timed(trainer.sample, policy_params, frozen, reference,
                                                 ids, key)
        compiled["sample"] = sample_c
        section = {"compile_s": sample_compile}
        if "sample" in sections:
            section.update(time_against_torch(
                timer, "sample",
                lambda: _block(sample_c(policy_params, frozen, reference, ids, key)),
                twin.sample if twin is not None else None))
            section["jax_images_per_s"] = batch / section["jax"]["median_s"]
            if twin is not None:
                section["torch_images_per_s"] = batch / section["torch"]["median_s"]
        result["sample"] = section

    # ---- the value step ----
    if "value" in sections or "epoch" in sections:
        # What Trainer.value_updates draws: value.batch_size states, at most the epoch's.
        nv = min(config.value.batch_size, batch * steps * config.sample.batches_per_epoch)
        vb_np = {"states": rng.standard_normal((nv, c, h, w)).astype(np.float32),
                 "timesteps": rng.integers(0, 1000, nv).astype(np.int32),
                 "context": np.repeat(ctx_np[batch:batch + 1], nv, axis=0),
                 "targets": rng.standard_normal(nv).astype(np.float32)}
        value_batch_j = trainer.put_batch({k: jnp.asarray(v) for k, v in vb_np.items()})
        log("value: compiling")
        value_c, value_compile = compile_timed(trainer.value_step, state, frozen, reference,
                                               value_batch_j)
        compiled["value_step"] = value_c
        section = {"batch": nv, "compile_s": value_compile}
        if "value" in sections:
            holder = {"state": state}
            if twin is not None:
                section["torch_max_abs_diff"] = _check_value_twin(torch, trainer, state, vb_np)

            def jax_value():
                holder["state"], metrics = value_c(holder["state"], frozen, reference,
                                                   value_batch_j)
                _block(metrics)

            torch_value = None
            if twin is not None:
                vt = {k: torch.from_numpy(v).to(twin.device) for k, v in vb_np.items()}

                def torch_value():
                    twin.value_step(vt["states"], vt["timesteps"], vt["context"], vt["targets"])

            section.update(time_against_torch(timer, "value", jax_value, torch_value))
            state = holder["state"]
        result["value"] = section

    # ---- the policy step ----
    if "policy" in sections or "epoch" in sections:
        policy_batch = trainer.put_batch({"ids": jnp.asarray(trainer.pipeline.tokenize(prompts))})
        log("policy: compiling")
        policy_c, policy_compile = compile_timed(trainer.policy_step, state, frozen, reference,
                                                 policy_batch, key)
        compiled["policy_step"] = policy_c
        section = {"compile_s": policy_compile, "grad_depth": 1,
                   "scan_unroll": str(trainer.loss_config.unroll),
                   "remat": config.policy.remat, "memory": memory_figures(policy_c)}
        if "policy" in sections:
            holder = {"state": state}

            def jax_policy():
                holder["state"], metrics = policy_c(holder["state"], frozen, reference,
                                                    policy_batch, key)
                _block(metrics)

            section.update(time_against_torch(timer, "policy", jax_policy,
                                              twin.policy_step if twin is not None else None))
            state = holder["state"]
        result["policy"] = section

    # ---- the epoch and its compute floor ----
    if "epoch" in sections:
        if model == "sd15":
            result["epoch"] = {"skipped": "the sd15 benchmark model has no VAE and no reward"}
        else:
            result["epoch"] = _epoch(trainer, state, compiled, result, timer)
            state = None

    # ---- peak memory of the policy step ----
    if "memory" in sections:
        result["memory"] = _memory_table(model, batch, memory_steps, args.dtype, value_batch,
                                         prompts, smoke=args.smoke)

    result["environment"]["loadavg_end"] = list(os.getloadavg())
    return result


def _check_value_twin(torch, trainer, state, batch: dict) -> float:
    """Max |V_jax - V_torch| on the value batch, with the (zero-initialised) head randomised."""
    params = jax.device_get(state.value_params)
    params = jax.tree_util.tree_map(np.asarray, params)
    head = f"Dense_{len([k for k in params if k.startswith('Dense_')]) - 1}"
    params[head] = dict(params[head], kernel=np.random.default_rng(1).standard_normal(
        params[head]["kernel"].shape).astype(np.float32) * 0.1)
    expected = np.asarray(trainer.value_model.apply(params, batch["states"], batch["timesteps"],
                                                    batch["context"], {}))
    module = _torch_value_module(torch, trainer.pipeline.sample_shape,
                                 batch["context"].shape[-1], trainer.config.value.width)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in
                            _torch_value_state(params).items()})
    with torch.no_grad():
        got = module(*(torch.from_numpy(batch[k]) for k in ("states", "timesteps", "context")))
    return float(np.max(np.abs(expected - got.numpy())))


def _epoch(trainer, state, compiled: dict, result: dict, timer: Timer) -> dict:
    from vard_jax.training import epochs
    from vard_jax.training.loop import Loop

    config = trainer.config
    # The Loop calls the trainer's jitted functions; give it the executables compiled above
    # (the same functions, so nothing compiles twice).
    trainer.sample = compiled["sample"]
    trainer.value_step = compiled["value_step"]
    trainer.policy_step = compiled["policy_step"]
    with tempfile.TemporaryDirectory() as workdir:
        loop = Loop(config, workdir, trainer=trainer)
        holder = {"state": state, "epoch": 0}

        def epoch():
            # The training loop's own epoch: VARD's collect -> value -> policy stages.
            s, key = epochs.split_key(holder["state"])
            s, metrics = loop.stage.epoch(s, holder["epoch"], key)
            _block(s)
            holder["state"], holder["epoch"] = s, holder["epoch"] + 1

        log("epoch: warm-up (compiles value_predict, the reward)")
        start = time.perf_counter()
        epoch()
        warmup = time.perf_counter() - start
        log("epoch: timing")
        times = timer.run({"epoch": epoch})["epoch"]
    steps = trainer.num_steps
    batches = config.sample.batches_per_epoch
    updates = config.policy.updates_per_epoch * batches
    unet = result.get("unet", {})
    fwd = unet["jax_forward"]["median_s"]
    fwd_bwd = unet["jax_forward_backward"]["median_s"]
    calls = {"forward_2B": steps * batches + steps * updates,
             "forward_backward_2B": steps * updates}
    floor = calls["forward_2B"] * fwd + calls["forward_backward_2B"] * fwd_bwd
    section = {"warmup_s": warmup, **summary(times), "unet_calls": calls, "floor_s": floor,
               "overhead": statistics.median(times) / floor,
               "value_updates": config.value.updates_per_epoch,
               "policy_updates": updates}
    if "sample" in result and "jax" in result["sample"]:
        section["sample_overhead"] = result["sample"]["jax"]["median_s"] / (steps * fwd)
    if "policy" in result and "jax" in result["policy"]:
        section["policy_step_overhead"] = result["policy"]["jax"]["median_s"] / (
            steps * (fwd + fwd_bwd))
    if "torch_forward" in unet:
        t_floor = (calls["forward_2B"] * unet["torch_forward"]["median_s"]
                   + calls["forward_backward_2B"] * unet["torch_forward_backward"]["median_s"])
        section["torch_floor_s"] = t_floor
        if "policy" in result and "torch" in result["policy"]:
            section["torch_policy_step_overhead"] = result["policy"]["torch"]["median_s"] / (
                steps * (unet["torch_forward"]["median_s"]
                         + unet["torch_forward_backward"]["median_s"]))
        if "sample" in result and "torch" in result["sample"]:
            section["torch_sample_overhead"] = result["sample"]["torch"]["median_s"] / (
                steps * unet["torch_forward"]["median_s"])
    return section


def _memory_table(model: str, batch: int, memory_steps: list[int], dtype: str,
                  value_batch: int, prompts: list[str], smoke: bool = False) -> dict:
    """Compiles the policy step for each (T, K, remat) with scan unroll 1; XLA's figures.
    ``smoke``: K = 1 only."""
    from vard_jax.training.trainer import Trainer

    rows = []
    for steps in memory_steps:
        for grad_depth in ((1,) if smoke else (1, steps)):
            for remat in ("none", "full"):
                config = make_config(model, batch, steps, grad_depth=grad_depth, remat=remat,
                                     unroll=1, value_batch=value_batch, dtype=dtype)
                trainer = Trainer(config)
                # Abstract inputs: the jitted step has explicit in_shardings.
                abstract = trainer.abstract_state
                ids = trainer.pipeline.tokenize(prompts)
                batch_spec = {"ids": jax.ShapeDtypeStruct(ids.shape, jnp.int32)}
                key = jax.random.PRNGKey(0)
                compiled, seconds = compile_timed(trainer.policy_step, abstract, trainer.frozen,
                                                  trainer.reference_params, batch_spec, key,
                                                  options=FAST_COMPILE)
                row = {"steps": steps, "grad_depth": grad_depth, "remat": remat,
                       "compile_s": seconds, **memory_figures(compiled)}
                log(f"memory: T {steps} K {grad_depth} remat {remat}: "
                    f"{row.get('peak_mib', float('nan')):.1f} MiB ({seconds:.1f} s)")
                rows.append(row)
    table = {"scan_unroll": 1, "batch": batch, "compiler_options": FAST_COMPILE, "rows": rows}
    low, high = min(memory_steps), max(memory_steps)
    for remat in ("none", "full"):
        peak = {r["steps"]: r.get("peak_mib") for r in rows
                if r["grad_depth"] == 1 and r["remat"] == remat}
        if peak.get(low) and peak.get(high) and low != high:
            table[f"k1_{remat}_growth_T{high}_over_T{low}"] = peak[high] / peak[low]
    return table


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
