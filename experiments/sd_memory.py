"""Peak memory and compile figures of VARD's jitted update steps at Stable Diffusion 1.5 size,
without weights and without running anything.

    PYTHONPATH=. .venv/bin/python experiments/sd_memory.py [--configs=NAME,GLOB,...|all]
        [--batch=1] [--value_batch=64] [--out=FILE] [--smoke] [--list] [--model=sd15|sd35]
        [--fast_compile] [--lower_only] [--attention=config|xla|chunked|cudnn]

``--model=sd35`` measures Stable Diffusion 3.5 Medium's MMDiT (2.5 B parameters) at 512 px
with the settings of configs/sd35_pickscore.py (LoRA rank 32 on both streams' attention
projections, the flow grid, the packed [B, 334, 4096] context) instead of SD 1.5's UNet.

Every piece is abstract: the UNet's parameters are ``jax.eval_shape(unet.init_params, key)``
(the project's ``UNet2DConditionModel`` with SD 1.5's config); the policy's trainable
parameters, the value model and both optimiser states are ``TrainState.initial`` (as training
builds them) under ``eval_shape``; the inputs are ``jax.ShapeDtypeStruct``. Each step is ``jax.jit(step, donate_argnums=0).lower(*abstract)
.compile()``; the figures are XLA's ``memory_analysis()`` (argument, output, temp, alias and
generated-code bytes; peak estimate = argument + output + temp - alias), ``cost_analysis()``
flops, and the seconds spent lowering and compiling. XLA's cost analysis counts the body of a
while loop once, so with the rolled scan the flops are about those of *one* denoising step
(forward, rematerialisation and backward), whatever T.

The steps:

* ``policy``: ``Trainer.policy_step`` (``vard_jax/training/trainer.py``) through the functions
  it is built from, ``steps.policy_inputs`` and ``steps.policy_update``: ``vard.policy_loss``
  over the differentiable rollout with the policy parametrisation of ``vard_jax.models.policy``
  (``FullPolicy``, or ``LoraPolicy`` rank 8 on to_q,to_k,to_v,to_out_0), the conv value model on
  latents [4, 64, 64], Adam (``training.optimizers.make_optimizers``) on the trainable parameters
  only, and ``faults.keep_finite``. The text context [B, 77, 768] and the null context
  [1, 77, 768] are inputs: the text encoder is frozen and outside the differentiated part, so
  it is left out (the Trainer needs loaded weights for it).
* ``value``: ``Steps.value_step`` through ``steps.value_update`` (conv value MSE + Adam)
  on a batch of ``--value_batch`` labelled states.
* ``sample``: the sampling scan without gradients (``Trainer.sample`` less the text encoder
  and the VAE decode).

Settings follow ``configs/pickscore.py`` (``sd_base``): bfloat16 computation (UNet dtype),
frozen weights stored in bfloat16, trainable parameters float32, eta 1, guidance 5 (a batched
[null; cond] UNet call per step), remat "full", K = 1. The differentiated scan uses unroll 1 (a
loop, as on GPU/TPU); ``rollout.resolve_unroll(0)`` would unroll it fully on the CPU backend.

Configuration names: ``policy-{lora|full}-{none|full|dots}-K{1|T}-T{steps}``, ``value-b{N}``,
``sample-{lora|full}-T{steps}``; ``--list`` prints the known ones, ``--configs`` takes names
and globs. ``--attention`` picks the UNet's attention kernel: ``config`` (default) follows
``pretrained.attention`` of configs/pickscore.py (``chunked``), ``xla`` materialises the
[L, L] scores (the what-if without the option), ``cudnn`` is the fused GPU kernel.
``--smoke`` uses a two-block tiny UNet (with ``--model=sd35`` a two-layer tiny MMDiT) with
T = 2 (and implies ``--fast_compile``, which skips
LLVM's optimisations: identical memory figures, shorter compiles; still about a minute per
policy step on a loaded 2-core CPU); ``--lower_only``
traces and lowers, reporting parameter and state sizes only.
Prints one JSON object (and writes it to ``--out`` after every configuration); progress lines
go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs import pickscore, sd35_pickscore
from vard_jax.diffusion import schedule as schedule_lib
from vard_jax.diffusion.flow import FlowMatchConfig
from vard_jax.models.nn import mmdit as nn_mmdit, unet as nn_unet
from vard_jax.algorithms import vard
from vard_jax.diffusion import rollout as rollout_lib
from vard_jax.diffusion.schedule import NoiseScheduleConfig
from vard_jax.models import loader, lora as lora_lib, policy as policy_lib, value as value_lib
from vard_jax.models.pipeline import MMDiTPipeline, Pipeline
from vard_jax.models.stable_diffusion import SD15_UNET_CONFIG
from vard_jax.training import optimizers as optimizers_lib, steps as steps_lib
from vard_jax.training.state import TrainState

GIB = 2.0**30

#: Stable Diffusion 1.5's UNet architecture (its ``unet/config.json``).
SD15_UNET = SD15_UNET_CONFIG
#: Stable Diffusion 1.5's ``scheduler/scheduler_config.json``.
SD15_SCHEDULE = NoiseScheduleConfig(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", steps_offset=1,
                                    set_alpha_to_one=False, clip_sample=False)
SD15_TEXT_LENGTH = 77

#: Stable Diffusion 3.5 Medium's ``transformer/config.json`` (the MMDiT-X of 2.5 B parameters)
#: and its scheduler; ``--model=sd35`` measures it at 512 px (64 x 64 latents, 1024 tokens),
#: the resolution of configs/sd35_pickscore.py.
SD35_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35_SCHEDULE = FlowMatchConfig(num_train_timesteps=1000, shift=3.0)
SD35_LATENT = 64
#: The packed context of ``SD3Pipeline``: 77 CLIP rows, 256 T5 rows, the pooled row.
SD35_TEXT_LENGTH = 77 + 256 + 1

#: ``--smoke``: a two-block tiny UNet of the same family (one cross-attention block).
SMOKE_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SMOKE_TEXT_LENGTH = 8
#: ``--smoke --model=sd35``: a two-layer tiny MMDiT-X (one dual-attention layer) on 8 x 8 latents.
SMOKE_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
    caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
    qk_norm="rms_norm", dual_attention_layers=(0,))

#: The default run: about 16 minutes on a 2-core CPU shared with other jobs (a policy step
#: compiles in 2-5 minutes there); see docs/IMPLEMENTATION.md for these and further figures.
DEFAULT_CONFIGS = (
    "policy-lora-full-K1-T10",
    "policy-lora-full-K1-T50",
    "policy-lora-full-KT-T10",
    "policy-lora-none-K1-T10",
    "policy-full-full-K1-T10",
    "value-b64",
    "sample-lora-T50",
)
SMOKE_CONFIGS = (
    "policy-lora-full-K1-T2",
    "policy-full-full-K1-T2",
    "policy-lora-none-KT-T2",
    "value-b8",
    "sample-lora-T2",
)
#: ``--smoke`` without ``--configs`` (a policy step of the tiny UNet still compiles for 20-60 s
#: on a loaded 2-core CPU: the UNet's op count, not its width, sets the compile time).
SMOKE_DEFAULT = ("policy-lora-full-K1-T2", "value-b8", "sample-lora-T2")


@dataclasses.dataclass(frozen=True)
class Variant:
    step: str  # policy | value | sample
    policy: str = "lora"  # lora | full
    remat: str = "full"
    depth: str = "1"  # "1" or "T"
    steps: int = 10
    batch: int = 0  # value batch (policy/sample use --batch)

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("-")
        try:
            if parts[0] == "policy" and len(parts) == 5:
                _, policy, remat, depth, steps = parts
                if policy not in ("lora", "full") or remat not in rollout_lib.REMAT_POLICIES:
                    raise ValueError
                if depth not in ("K1", "KT"):
                    raise ValueError
                return cls("policy", policy, remat, depth[1:], int(steps.removeprefix("T")))
            if parts[0] == "value" and len(parts) == 2:
                return cls("value", batch=int(parts[1].removeprefix("b")))
            if parts[0] == "sample" and len(parts) == 3 and parts[1] in ("lora", "full"):
                return cls("sample", parts[1], steps=int(parts[2].removeprefix("T")))
        except ValueError:
            pass
        raise ValueError(f"configuration {name!r}: use policy-{{lora|full}}-{{none|full|dots}}-"
                         f"{{K1|KT}}-T<steps>, value-b<batch> or sample-{{lora|full}}-T<steps>")


def all_configs(smoke: bool) -> list[str]:
    """Every named configuration the script knows (``--configs=all``)."""
    if smoke:
        return list(SMOKE_CONFIGS)
    names = [f"policy-{p}-{r}-{k}-T{t}" for p in ("lora", "full") for r in ("full", "none")
             for k in ("K1", "KT") for t in (10, 20, 50)]
    return names + ["value-b64", "sample-lora-T50", "sample-full-T50"]


def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree_util.tree_leaves(tree)))


class Model:
    """The abstract SD-size pieces shared by every configuration."""

    def __init__(self, smoke: bool, attention: str = "config", model: str = "sd15"):
        self.smoke = smoke
        self.sd35 = model == "sd35"
        # bf16 compute/storage, LoRA (rank 8 on SD 1.5; 32 on both MMDiT streams for SD 3.5),
        # remat full, K = 1
        self.config = sd35_pickscore.get_config() if self.sd35 else pickscore.sd_base()
        self.compute_dtype = jnp.dtype(self.config.pretrained.dtype)
        self.param_dtype = jnp.dtype(self.config.pretrained.param_dtype)
        # The attention kernel loader.load gives the UNet (pretrained.attention), or the one asked.
        self.attention = self.config.pretrained.attention if attention == "config" else attention
        if self.sd35:
            architecture = SMOKE_TRANSFORMER if smoke else SD35_TRANSFORMER
            unet = nn_mmdit.SD3Transformer2DModel(nn_mmdit.MMDiTConfig.from_dict(architecture),
                                                  dtype=self.compute_dtype,
                                                  implementation=self.attention)
            self.text_length = SMOKE_TEXT_LENGTH + 1 if smoke else SD35_TEXT_LENGTH
            self.context_dim = unet.config.joint_attention_dim
            latent = architecture["sample_size"] if smoke else SD35_LATENT
            self.pipeline = MMDiTPipeline(unet=unet, text_encoder=None, tokenizer=None,
                                          schedule=SD35_SCHEDULE,
                                          sample_shape=(architecture["in_channels"], latent,
                                                        latent),
                                          max_length=self.text_length - 1)
            init = lambda k: unet.init_params(k, context_length=self.text_length - 1)  # noqa: E731
        else:
            unet_config = SMOKE_UNET if smoke else SD15_UNET
            self.text_length = SMOKE_TEXT_LENGTH if smoke else SD15_TEXT_LENGTH
            unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(unet_config),
                                                dtype=self.compute_dtype,
                                                implementation=self.attention)
            size = unet_config["sample_size"]
            self.pipeline = Pipeline(unet=unet, text_encoder=None, tokenizer=None,
                                     schedule=SD15_SCHEDULE,
                                     sample_shape=(unet_config["in_channels"], size, size),
                                     max_length=self.text_length)
            self.context_dim = unet_config["cross_attention_dim"]
            init = unet.init_params
        key = jax.random.PRNGKey(0)
        # The frozen reference UNet, stored as pretrained.param_dtype (loader.load's cast).
        self.reference = jax.eval_shape(
            lambda k: loader.cast_floats(init(k), self.param_dtype), key)
        self.value_model = value_lib.conv_value(self.pipeline.sample_shape,
                                                (self.text_length, self.context_dim),
                                                self.config.value.width)

    def policy_model(self, kind: str) -> policy_lib.PolicyModel:
        policy_config = self.config.policy.copy_and_resolve_references()
        if kind != "lora":
            policy_config.lora_rank = 0
        return policy_lib.make(policy_config, self.pipeline)

    def optimizers(self):
        config = self.config  # VARD: no DDPO steps, one data shard
        optimizers = optimizers_lib.make_optimizers(
            config, optimizers_lib.policy_updates_per_epoch(config, 0, 1))
        return optimizers.policy, optimizers.value

    def abstract_state(self, policy: policy_lib.PolicyModel, policy_opt, value_opt) -> TrainState:
        """The run's first state (``TrainState.initial``, as training builds it) under
        eval_shape."""
        return jax.eval_shape(
            lambda reference: TrainState.initial(self.config.train.seed, policy, reference,
                                                 self.value_model, policy_opt, value_opt),
            self.reference)


def build(model: Model, variant: Variant, batch: int):
    """(jitted function, abstract arguments, facts) of one configuration."""
    config = model.config
    pipeline, reference = model.pipeline, model.reference
    shape = pipeline.sample_shape
    value_apply = model.value_model.apply
    ctx_dtype = model.compute_dtype  # the text encoder computes in pretrained.dtype
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    policy = model.policy_model(variant.policy)
    num_steps = variant.steps
    policy_opt, value_opt = model.optimizers()
    state = model.abstract_state(policy, policy_opt, value_opt)
    facts = {
        "trainable_params": lora_lib.count(state.policy_params),
        "trainable_bytes": tree_bytes(state.policy_params),
        "opt_state_bytes": tree_bytes(state.policy_opt_state),
        "reference_params": lora_lib.count(reference),
        "reference_bytes": tree_bytes(reference),
        "value_params": lora_lib.count(state.value_params),
        "state_bytes": tree_bytes(state),
    }
    context = jax.ShapeDtypeStruct((batch, model.text_length, model.context_dim), ctx_dtype)
    null_context = jax.ShapeDtypeStruct((1, model.text_length, model.context_dim), ctx_dtype)

    if variant.step == "value":
        n = variant.batch

        def value_step(state: TrainState, reference_params, batch: dict):
            # Trainer.value_step with the conv value (value_aux is empty).
            del reference_params
            return steps_lib.value_update(value_apply, value_opt, state, batch, {})

        value_batch = {
            "states": jax.ShapeDtypeStruct((n,) + tuple(shape), jnp.float32),
            "timesteps": jax.ShapeDtypeStruct((n,), jnp.int32),
            "context": jax.ShapeDtypeStruct((n, model.text_length, model.context_dim), ctx_dtype),
            "targets": jax.ShapeDtypeStruct((n,), jnp.float32),
        }
        # The parameters this step trains are the value model's.
        facts.update(value_batch=n, trainable_params=facts["value_params"],
                     trainable_bytes=tree_bytes(state.value_params),
                     opt_state_bytes=tree_bytes(state.value_opt_state))
        return (jax.jit(value_step, donate_argnums=0), (state, reference, value_batch), facts)

    schedule = schedule_lib.make_schedule(pipeline.schedule, num_steps, pipeline.image_seq_len)
    facts.update(num_steps=num_steps, batch=batch)

    if variant.step == "sample":
        def sample(policy_params, reference_params, context, null_context, key):
            # Trainer.sample less the text encoder and the VAE decode (no gradients).
            x_T, noise = rollout_lib.sample_noise(key, context.shape[0], num_steps, shape)
            trajectory, _ = rollout_lib.rollout(
                policy.eps_fn, policy.unet(policy_params, reference_params), schedule, x_T,
                noise, context, null_context, eta=config.sample.eta,
                guidance_scale=config.sample.guidance_scale)
            return trajectory.x_prev, trajectory.x0

        return (jax.jit(sample), (state.policy_params, reference, context, null_context, key),
                facts)

    grad_depth = num_steps if variant.depth == "T" else 1
    loss_config = vard.PolicyLossConfig(
        beta=config.policy.beta, grad_depth=grad_depth, eta=config.sample.eta,
        guidance_scale=config.sample.guidance_scale, remat=variant.remat,
        python_loop=False, unroll=1)  # a loop, as on GPU/TPU (not resolve_unroll(0) on CPU)
    facts.update(grad_depth=grad_depth, remat=variant.remat)

    def policy_step(state: TrainState, reference_params, batch: dict, key):
        # Trainer.policy_step, the text encoder left out (context and null context are inputs).
        inputs = steps_lib.policy_inputs(key, batch["context"], batch["null_context"],
                                           num_steps, shape, config.policy.train_fraction, {})
        return steps_lib.policy_update(policy, value_apply, policy_opt, schedule, loss_config,
                                         state, reference_params, inputs)

    policy_batch = {"context": context, "null_context": null_context}
    return (jax.jit(policy_step, donate_argnums=0), (state, reference, policy_batch, key), facts)


def _flops(compiled) -> Optional[float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None else None


def measure(model: Model, name: str, batch: int, lower_only: bool = False,
            fast_compile: bool = False) -> dict:
    variant = Variant.parse(name)
    fn, args, facts = build(model, variant, batch)
    started = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    head = {"name": name, "step": variant.step,
            **({"policy": variant.policy} if variant.step != "value" else {}), **facts}
    if lower_only:
        return {**head, "lower_s": round(lowered_at - started, 1)}
    # Level 0 skips LLVM's optimisations only: buffer assignment (the memory figures) and the
    # HLO passes are the same (checked on the smoke configurations); compile_s is then lower.
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    compiled = lowered.compile(compiler_options=options)
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    figures = {key: int(getattr(memory, key)) for key in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    peak = (figures["argument_size_in_bytes"] + figures["output_size_in_bytes"]
            + figures["temp_size_in_bytes"] - figures["alias_size_in_bytes"])
    flops = _flops(compiled)
    return {
        **head,
        "memory": figures,
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 3),
        "temp_gib": round(figures["temp_size_in_bytes"] / GIB, 3),
        "argument_gib": round(figures["argument_size_in_bytes"] / GIB, 3),
        "lower_s": round(lowered_at - started, 1),
        "compile_s": round(compiled_at - lowered_at, 1),
        "flops": flops,
        "gflops": round(flops / 1e9, 1) if flops is not None else None,
    }


def select(spec: str, smoke: bool) -> list[str]:
    known = all_configs(smoke)
    if not spec:
        return list(SMOKE_DEFAULT if smoke else DEFAULT_CONFIGS)
    if spec == "all":
        return known
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        matches = fnmatch.filter(known, item) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise ValueError(f"--configs pattern {item!r} matches none of: {', '.join(known)}")
        for match in matches:
            Variant.parse(match)  # validate
            if match not in names:
                names.append(match)
    return names


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="",
                        help="comma-separated names or globs, or 'all' (default: the default set)")
    parser.add_argument("--batch", type=int, default=1, help="images per device (policy, sample)")
    parser.add_argument("--value_batch", type=int, default=0,
                        help="overrides the batch of every value-b<N> configuration")
    parser.add_argument("--out", default="", help="also write the JSON object here")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny 2-block UNet, T = 2 (implies --fast_compile)")
    parser.add_argument("--list", action="store_true", help="print the configuration names")
    parser.add_argument("--attention", choices=("config", "xla", "chunked", "cudnn"),
                        default="config",
                        help="UNet attention kernel: as configs/pickscore.py sets it (chunked), "
                             "xla (full [L, L] scores), chunked or cudnn (GPU)")
    parser.add_argument("--model", choices=("sd15", "sd35"), default="sd15",
                        help="Stable Diffusion 1.5's UNet, or 3.5 Medium's MMDiT at 512 px")
    parser.add_argument("--lower_only", action="store_true",
                        help="trace and lower only: parameter and state sizes, no XLA figures")
    parser.add_argument("--fast_compile", action="store_true",
                        help="compile without LLVM optimisations (same memory figures, faster)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.list:
        print("\n".join(all_configs(args.smoke)))
        return {}
    names = select(args.configs, args.smoke)
    if args.value_batch:
        names = [f"value-b{args.value_batch}" if n.startswith("value-") else n for n in names]
    args.fast_compile = args.fast_compile or args.smoke
    started = time.perf_counter()
    model = Model(args.smoke, args.attention, args.model)
    if model.sd35:
        architecture = SMOKE_TRANSFORMER if args.smoke else SD35_TRANSFORMER
        described = ("smoke (2-layer tiny MMDiT)" if args.smoke else
                     "Stable Diffusion 3.5 Medium MMDiT, 512 px")
    else:
        architecture = SMOKE_UNET if args.smoke else SD15_UNET
        described = "smoke (2-block tiny UNet)" if args.smoke else "Stable Diffusion 1.5"
    report = {
        "unet": described,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in architecture.items()},
        "compute_dtype": str(model.compute_dtype),
        "frozen_param_dtype": str(model.param_dtype),
        "trainable_dtype": "float32",
        "eta": model.config.sample.eta,
        "guidance_scale": model.config.sample.guidance_scale,
        "batch_per_device": args.batch,
        "scan_unroll": 1,
        "attention": model.attention,
        "lower_only": args.lower_only,
        "fast_compile": args.fast_compile,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "peak_estimate": "argument + output + temp - alias (XLA memory_analysis)",
        "results": [],
    }
    for name in names:
        print(f"[sd_memory] {name} ...", file=sys.stderr, flush=True)
        row = measure(model, name, args.batch, args.lower_only, args.fast_compile)
        if not args.lower_only:
            print(f"[sd_memory] {name}: peak {row['peak_gib']} GiB, temp {row['temp_gib']} GiB, "
                  f"lower {row['lower_s']} s, compile {row['compile_s']} s, "
                  f"{row['gflops']} GFLOP", file=sys.stderr, flush=True)
        report["results"].append(row)
        report["total_s"] = round(time.perf_counter() - started, 1)
        if args.out:  # after every configuration, so that a long run leaves partial figures
            with open(args.out, "w") as file:
                file.write(json.dumps(report, indent=1) + "\n")
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
