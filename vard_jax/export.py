"""Export a run's policy for diffusers (PyTorch): a LoRA file or a merged UNet (or SD 3's MMDiT),
with a model card.

    python -m vard_jax.export --workdir=runs/pickscore --out=export/pickscore
    python -m vard_jax.export --workdir=DIR --step=40 --format=merged --out=OUT

``--format=lora`` (the default for a LoRA run) writes ``OUT/pytorch_lora_weights.safetensors``,
which ``StableDiffusionPipeline.load_lora_weights(OUT)`` reads; only the adapters are read
from the checkpoint, so neither the base model nor the reward is needed. ``--format=merged``
(the default for full fine-tuning) writes ``OUT/unet/`` (``OUT/transformer/`` for an MMDiT:
SD 3 / 3.5, the shapes flow model) in diffusers' layout (``config.json`` +
``diffusion_pytorch_model.safetensors``, float32, adapters merged into the base weights as
stored, whatever ``pretrained.param_dtype`` the run computed with), for
``UNet2DConditionModel.from_pretrained(OUT, subfolder="unet")`` (``SD3Transformer2DModel``,
``subfolder="transformer"``); it loads the base model. A LoRA file of an MMDiT names its
modules ``transformer.<module>``, as ``StableDiffusion3Pipeline.load_lora_weights`` expects.
Both write ``OUT/README.md`` (a model card: base model, reward, algorithm and settings, the
reward before and after, the command that trained it) and ``OUT/vard_config.json``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import ml_collections

from vard_jax.config import PPO_ALGORITHMS

FORMATS = ("auto", "lora", "merged")


class ExportError(ValueError):
    """A problem with the arguments or the run; the message is one line for the user."""


def _format_for(config: ml_collections.ConfigDict, asked: str) -> str:
    if asked not in FORMATS:
        raise ExportError(f"--format={asked}: choose one of {', '.join(FORMATS)}")
    lora = int(config.policy.lora_rank) > 0
    if asked == "auto":
        return "lora" if lora else "merged"
    if asked == "lora" and not lora:
        raise ExportError("--format=lora: this run fine-tuned the whole network "
                          "(policy.lora_rank = 0); use --format=merged")
    return asked


def _check_out(out: pathlib.Path, workdir: pathlib.Path) -> None:
    """OUT must be new or empty: an export never overwrites files, and never goes into the run."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} exists and is not an empty directory; choose a new one")
    resolved, run = out.resolve(), workdir.resolve()
    if resolved == run or run in resolved.parents:
        raise ExportError(f"--out={out} is inside the run's workdir; choose a directory outside it")


def _base_model(config: ml_collections.ConfigDict) -> str:
    if config.pretrained.family == "stable_diffusion":
        from vard_jax.models.stable_diffusion import DEFAULT_MODEL_ID

        return config.pretrained.path or DEFAULT_MODEL_ID
    return config.pretrained.path or f"the shipped {config.pretrained.family} model"


def _reward_at(rows: list[dict], step: int) -> dict:
    """{label: value} of the evaluation means in the row of ``step``."""
    row = next((r for r in rows if r["step"] == step), {})
    means = {}
    for key in sorted(row):
        if (not (key.startswith("eval_") and key.endswith("_mean")) or key == "eval_reward_mean"
                or not isinstance(row[key], (int, float))):
            continue
        name = key.removeprefix("eval_").removesuffix("_mean")
        label = (f"{name.removeprefix('train_')}, training prompts" if name.startswith("train_")
                 else f"{name}, held-out prompts")
        means[label] = row[key]
    return means


def _commands(workdir: pathlib.Path) -> list[str]:
    from vard_jax.training.workdir import COMMANDS_NAME

    path = workdir / COMMANDS_NAME
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings a reader of the card needs to reproduce or compare the run."""
    algorithm = config.algorithm
    fields = {"algorithm": algorithm, "reward": config.reward.name,
              "sample.num_steps": config.sample.num_steps, "sample.eta": config.sample.eta,
              "sample.eval_eta": config.sample.eval_eta,
              "sample.guidance_scale": config.sample.guidance_scale,
              "sample.batch_size": config.sample.batch_size,
              "policy.lora_rank": config.policy.lora_rank,
              "pretrained.dtype": config.pretrained.dtype}
    if int(config.policy.lora_rank):
        fields["policy.lora_alpha"] = config.policy.lora_alpha or config.policy.lora_rank
        fields["policy.lora_targets"] = config.policy.lora_targets
    if algorithm == "vard":
        fields.update({"policy.beta": config.policy.beta, "policy.kl_on": config.policy.kl_on,
                       "policy.grad_depth": config.policy.grad_depth,
                       "policy.learning_rate": config.policy.learning_rate,
                       "value.arch": config.value.arch})
    elif algorithm in PPO_ALGORITHMS:
        fields.update({"ddpo.learning_rate": config.ddpo.learning_rate,
                       "ddpo.clip_range": config.ddpo.clip_range})
        if algorithm == "grpo":
            fields.update({"grpo.group_size": config.grpo.group_size,
                           "grpo.beta": config.grpo.beta})
    elif algorithm == "draft":
        fields.update({"draft.grad_depth": config.draft.grad_depth,
                       "policy.learning_rate": config.policy.learning_rate})
    return fields


def model_card(config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int,
               fmt: str, denoiser: str = "unet") -> str:
    """The README.md of an export directory."""
    from vard_jax.training.metrics import read_rows

    rows = read_rows(workdir / "metrics.jsonl")
    before, after = _reward_at(rows, 0), _reward_at(rows, step)
    base = _base_model(config)
    lines = [f"# {config.algorithm.upper()} fine-tune of {base}", "",
             f"Fine-tuned with vard_jax toward the `{config.reward.name}` reward: "
             f"{config.algorithm} for {step} epoch{'' if step == 1 else 's'} "
             f"({'LoRA adapters' if fmt == 'lora' else 'merged ' + _DIFFUSERS_CLASSES[denoiser][1]}"
             f" of checkpoint {step}).", ""]
    lines += _usage(config, base, fmt, denoiser)
    lines += ["## Rewards before and after", "",
              "Means over the run's evaluation samples (fixed prompts and noise).", ""]
    keys = sorted(set(before) | set(after))
    if keys:
        lines += ["| reward | step 0 | step " + str(step) + " |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys]
    else:
        lines.append("(no evaluation rows in metrics.jsonl)")
    lines += ["", "## Settings", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings(config).items()]
    commands = _commands(workdir)
    lines += ["", "## Command", ""]
    lines += (["```", *commands, "```"] if commands else
              ["(not recorded: the run was not started with python -m vard_jax.main)"])
    lines += ["", "The full config is `vard_config.json`.", ""]
    return "\n".join(lines)


#: (pipeline class, network class) of the diffusers pipelines, by the network's folder name.
_DIFFUSERS_CLASSES = {"unet": ("StableDiffusionPipeline", "UNet2DConditionModel"),
                      "transformer": ("StableDiffusion3Pipeline", "SD3Transformer2DModel")}


def _usage(config: ml_collections.ConfigDict, base: str, fmt: str, denoiser: str) -> list[str]:
    """The card's loading snippet: a diffusers pipeline for Stable Diffusion; for the shapes
    world (a pixel-space model without a VAE) the network alone. ``denoiser``: ``unet`` or
    ``transformer`` (``diffusers_export.denoiser_name``)."""
    from vard_jax.models import diffusers_export

    pipeline_class, model_class = _DIFFUSERS_CLASSES[denoiser]
    if config.pretrained.family == "stable_diffusion":
        if fmt == "lora":
            code = [f"from diffusers import {pipeline_class}", "",
                    f'pipe = {pipeline_class}.from_pretrained("{base}")',
                    'pipe.load_lora_weights("<this directory>")']
        else:
            code = [f"from diffusers import {pipeline_class}, {model_class}", "",
                    f'{denoiser} = {model_class}.from_pretrained("<this directory>", '
                    f'subfolder="{denoiser}")',
                    f'pipe = {pipeline_class}.from_pretrained("{base}", {denoiser}={denoiser})']
        return ["```python", *code, "```", ""]
    note = (f"The {config.pretrained.family} model is a pixel-space {model_class} without a VAE; "
            "its text encoder and tokenizer are those of vard_jax/assets.")
    if fmt == "lora":
        code = [f"from diffusers import {model_class}", "",
                f"{denoiser} = {model_class}.from_pretrained(<the base model exported merged>)",
                f'{denoiser}.load_lora_adapter("<this directory>", prefix="{denoiser}", '
                f'weight_name="{diffusers_export.LORA_WEIGHTS}")']
    else:
        code = [f"from diffusers import {model_class}", "",
                f'{denoiser} = {model_class}.from_pretrained("<this directory>", '
                f'subfolder="{denoiser}")']
    return [note, "", "```python", *code, "```", ""]


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, step: Optional[int] = None,
           fmt: str = "auto") -> dict:
    """Writes the export of ``workdir``'s checkpoint ``step`` (default: the latest) to ``out``;
    returns a summary (format, step, files)."""
    from vard_jax.training import runs

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    try:
        resolved = runs.resolve_config(runs.ModelSpec(workdir=workdir, step=step))
    except runs.EvaluationError as error:
        raise ExportError(str(error)) from None
    config, step = resolved.config, int(resolved.step)
    fmt = _format_for(config, fmt)
    _check_out(out, workdir)
    checkpointer = runs.open_checkpointer(workdir)
    from vard_jax.training.checkpoints import CheckpointError

    try:
        trained = checkpointer.restore_field("policy_params", step)
    except CheckpointError as error:
        raise ExportError(str(error).splitlines()[0]) from None
    finally:
        checkpointer.close()
    try:
        files = _write(config, workdir, out, step, fmt, trained)
    except OSError as error:
        raise ExportError(f"--out={out} cannot be written ({error.strerror or error}); choose "
                          "another directory") from None
    return {"format": fmt, "step": step, "out": str(out), "files": [str(f) for f in files]}


def _write(config: ml_collections.ConfigDict, workdir: pathlib.Path, out: pathlib.Path,
           step: int, fmt: str, trained: Any) -> list[pathlib.Path]:
    from vard_jax.models import diffusers_export, policy as policy_lib

    files = []
    denoiser = diffusers_export.denoiser_name(trained)
    if fmt == "lora":
        rank = int(config.policy.lora_rank)
        scale = (float(config.policy.lora_alpha) or float(rank)) / rank
        files.append(diffusers_export.save_diffusers_lora(trained, scale, out, prefix=denoiser))
    else:
        from vard_jax.models import loader

        base = config.copy_and_resolve_references()  # merged in float32 into the weights as
        base.pretrained.param_dtype = "float32"  # stored, as load_lora_weights + fuse would
        try:
            loaded = loader.load(base)
        except (FileNotFoundError, ValueError) as error:
            raise ExportError(f"the base model cannot be loaded for merging: "
                              f"{str(error).splitlines()[0]}") from None
        policy = policy_lib.make(config.policy, loaded.pipeline)
        merged = policy.merged(trained, loaded.params["unet"])
        directory = diffusers_export.save_model(loaded.pipeline.unet, merged, out / denoiser)
        files += sorted(directory.iterdir())
    (out / "vard_config.json").write_text(config.to_json(indent=2) + "\n")
    (out / "README.md").write_text(model_card(config, workdir, step, fmt, denoiser))
    return files + [out / "vard_config.json", out / "README.md"]


def main(argv: list[str]) -> None:
    from absl import flags

    from vard_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --workdir=DIR --out=OUT")
    values = flags.FLAGS
    if not values.workdir or not values.out:
        cli.fail("--workdir (a training run) and --out (a new directory) are required")
    from vard_jax.cli import quiet_logging

    quiet_logging()
    try:
        summary = export(values.workdir, values.out, values.step, values.format)
    except ExportError as error:
        cli.fail(str(error))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    from absl import flags as _flags

    from vard_jax import cli as _cli

    _flags.DEFINE_string("workdir", None, "Training run directory.")
    _flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    _flags.DEFINE_string("out", None, "New (or empty) directory to write the export to.")
    _flags.DEFINE_enum("format", "auto", FORMATS, "lora: the adapters as diffusers' "
                       "pytorch_lora_weights.safetensors; merged: the UNet with the adapters "
                       "merged, in diffusers' layout; auto: lora for a LoRA run, else merged.")
    _cli.run(main)
