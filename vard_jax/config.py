"""Start-up validation of a configuration against the schema, ``vard_jax/schema.py``.

``validate(config, device_count)`` raises ``ConfigError`` with one line that names the field,
the value and what is allowed; entry points turn it into that line on stderr and exit status 2.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import ml_collections

# Choices the implementations accept, repeated here to keep jax out of start-up validation
# (tests/test_config.py checks that they match).
ALGORITHMS = ("vard", "value", "ddpo", "grpo", "draft")
#: The algorithms trained with PPO on stored transitions (``training/epochs/ddpo.py``).
PPO_ALGORITHMS = ("ddpo", "grpo")
DDPO_REDUCTIONS = ("mean", "sum")
MODEL_FAMILIES = ("shapes", "shapes_flow")
MODEL_FAMILIES += ("stable_diffusion",)  # vard_jax/models/stable_diffusion.py
VALUE_ARCHS = ("conv", "conv_x0", "reward_init", "unet_head")
REMAT_POLICIES = ("none", "full", "dots", "blocks")
CLIP_GRADIENTS = ("exact", "straight_through")
LR_SCHEDULES = ("constant", "cosine")
KL_ON = ("conditional", "guided")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("xla", "cudnn", "chunked")  # vard_jax/models/nn/attention.py


class ConfigError(ValueError):
    """A configuration value that cannot run; the message is one line for the user."""


def base_config() -> ml_collections.ConfigDict:
    """The reference schema: ``vard_jax.schema.get_config()``."""
    from vard_jax import schema

    return schema.get_config()


#: config.logging.wandb_mode ("": WANDB_MODE, else online).
WANDB_MODES = ("", "online", "offline", "disabled")

# Keys added with a default that changes what a run of an algorithm does: a config of that
# algorithm saved before the key existed gets the value that keeps its old behaviour
# (with_defaults), not today's default. (algorithm, section, key, value before the key)
BEHAVIOUR_BEFORE_KEY = (
    # DDPO as ddpo-pytorch runs it (accumulation over timesteps, reward buffers, its rate).
    ("ddpo", "ddpo", "accumulate_timesteps", False),
    ("ddpo", "ddpo", "gradient_accumulation", 1),
    ("ddpo", "ddpo", "stat_buffer", 0),
    ("ddpo", "ddpo", "stat_min_count", 2),
    ("ddpo", "ddpo", "learning_rate", 0.0),
    # The KL term on the guided predictions, the default before "conditional".
    ("vard", "policy", "kl_on", "guided"),
    ("draft", "policy", "kl_on", "guided"),
)


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A config saved by a run (plain JSON data), completed with defaults for the keys it
    lacks, so that checkpoints written before a key was added stay loadable and train as they
    did: a key it lacks gets today's default, or its ``BEHAVIOUR_BEFORE_KEY`` value where
    today's default changed the behaviour. Saved values win; keys unknown to the schema are
    kept, so that ``validate`` names them."""
    saved = {key: dict(value) if isinstance(value, dict) else value
             for key, value in saved.items()}
    for algorithm, section, key, value in BEHAVIOUR_BEFORE_KEY:
        if (saved.get("algorithm", "vard") == algorithm and isinstance(saved.get(section), dict)
                and key not in saved[section]):
            saved[section][key] = value

    def merge(defaults: dict, values: dict) -> dict:
        merged = dict(defaults)
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(defaults.get(key), dict):
                merged[key] = merge(defaults[key], value)
            else:
                merged[key] = value
        return merged

    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def _leaves(config: ml_collections.ConfigDict, prefix: str = "config") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        path = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, path)
        else:
            yield path, value


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for key in path.split(".")[1:]:
        node = node[key]
    return node


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_schema(config: Any) -> None:
    """Raises ConfigError (one line) unless ``config`` is a ConfigDict with exactly the
    sections and keys of ``vard_jax/schema.py`` (unknown or missing ones are named), each of the
    schema's type. Needs no jax: entry points call it before anything else."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"the config is a {_type_name(config)}, not an ml_collections."
                          "ConfigDict: get_config() should start from vard_jax.schema.get_config() "
                          "and change fields")
    _check_schema(config, base_config())


def _check_schema(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    reference_leaves = dict(_leaves(reference))
    reference_sections = {p for p, _ in _sections(reference)}
    for path, _ in _sections(config):
        if path not in reference_sections:
            raise ConfigError(f"{path}: unknown section; known sections: "
                              f"{', '.join(sorted(s.split('.', 1)[1] for s in reference_sections))}")
    sections = {p for p, _ in _sections(config)}
    leaves = {p for p, _ in _leaves(config)}
    for path in sorted(reference_sections - sections):
        if path.rsplit(".", 1)[0] in sections | {"config"}:
            raise ConfigError(f"{path}: missing section; start the config from "
                              "vard_jax.schema.get_config() (it has every section with its defaults)")
    missing = [p for p in reference_leaves if p not in leaves]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{missing[0]}: missing key{more} (vard_jax/schema.py's default: "
                          f"{reference_leaves[missing[0]]!r}); start the config from "
                          "vard_jax.schema.get_config() or set it")
    for path, value in _leaves(config):
        if path not in reference_leaves:
            section = path.rsplit(".", 1)[0]
            known = sorted(p.rsplit(".", 1)[1] for p in reference_leaves if p.rsplit(".", 1)[0] == section)
            raise ConfigError(f"{path}: unknown key; {section} has: {', '.join(known)}")
        expected = reference_leaves[path]
        if isinstance(expected, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(expected, bool)
        elif isinstance(expected, float):
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, type(expected))
        if not ok:
            raise ConfigError(f"{path} = {value!r}: expected type {_type_name(expected)}, "
                              f"got {_type_name(value)}")


def _sections(config: ml_collections.ConfigDict, prefix: str = "config") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            path = f"{prefix}.{key}"
            yield path, value
            yield from _sections(value, path)


# (field, predicate, what is allowed)
_Rule = tuple[str, Callable[[Any], bool], str]

_RULES: tuple[_Rule, ...] = (
    ("config.algorithm", lambda v: v in ALGORITHMS, f"one of {', '.join(ALGORITHMS)}"),
    ("config.pretrained.family", lambda v: v in MODEL_FAMILIES, f"one of {', '.join(MODEL_FAMILIES)}"),
    ("config.pretrained.dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    ("config.pretrained.param_dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    ("config.pretrained.attention", lambda v: v in ATTENTION, f"one of {', '.join(ATTENTION)}"),
    ("config.pretrained.resolution", lambda v: v >= 0, ">= 0 (0 = the model's own)"),
    ("config.sample.num_steps", lambda v: 1 <= v <= 1000, "an integer in [1, 1000]"),
    ("config.sample.eta", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    ("config.sample.eval_eta", lambda v: v == -1.0 or 0.0 <= v <= 1.0,
     "a number in [0, 1], or -1 for sample.eta"),
    ("config.sample.guidance_scale", lambda v: 0.0 <= v <= 100.0, "a number in [0, 100]"),
    ("config.sample.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("config.sample.batches_per_epoch", lambda v: v >= 1, "an integer >= 1"),
    ("config.sample.eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("config.sample.eval_batches", lambda v: v >= 1, "an integer >= 1 (every run evaluates)"),
    ("config.sample.train_prompts", lambda v: bool(v.strip()), "a split name or a prompts file"),
    ("config.sample.eval_prompts", lambda v: bool(v.strip()), "a split name or a prompts file"),
    ("config.reward.name", lambda v: bool(v.strip()), "a reward name or 'a:1.0,b:0.5'"),
    ("config.value.arch", lambda v: v in VALUE_ARCHS, f"one of {', '.join(VALUE_ARCHS)}"),
    ("config.value.width", lambda v: v >= 1, "an integer >= 1"),
    ("config.value.learning_rate", lambda v: v > 0.0, "a number > 0"),
    ("config.value.weight_decay", lambda v: v >= 0.0, "a number >= 0"),
    ("config.value.grad_clip", lambda v: v >= 0.0, "a number >= 0 (0 = off)"),
    ("config.value.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("config.value.pretrain_epochs", lambda v: v >= 0, "an integer >= 0"),
    ("config.value.updates_per_epoch", lambda v: v >= 1, "an integer >= 1"),
    ("config.value.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("config.value.stats_decay", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("config.value.replay_epochs", lambda v: v >= 1, "an integer >= 1 (1 = this epoch only)"),
    ("config.policy.learning_rate", lambda v: v > 0.0, "a number > 0"),
    ("config.policy.weight_decay", lambda v: v >= 0.0, "a number >= 0"),
    ("config.policy.grad_clip", lambda v: v >= 0.0, "a number >= 0 (0 = off)"),
    ("config.policy.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("config.policy.lr_schedule", lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
    ("config.policy.beta", lambda v: v >= 0.0, "a number >= 0"),
    ("config.policy.train_fraction", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("config.policy.updates_per_epoch", lambda v: v >= 1, "an integer >= 1"),
    ("config.policy.remat", lambda v: v in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}"),
    ("config.policy.kl_on", lambda v: v in KL_ON, f"one of {', '.join(KL_ON)}"),
    ("config.policy.lora_rank", lambda v: v >= 0, "an integer >= 0 (0 = full fine-tuning)"),
    ("config.policy.lora_alpha", lambda v: v >= 0.0, "a number >= 0 (0 = the rank)"),
    ("config.policy.lora_targets", lambda v: bool(v.strip()), "comma-separated Dense layer names"),
    ("config.policy.scan_unroll", lambda v: v >= 0, "an integer >= 0 (0 = auto)"),
    ("config.policy.clip_x0_gradient", lambda v: v in CLIP_GRADIENTS,
     f"one of {', '.join(CLIP_GRADIENTS)}"),
    ("config.ddpo.clip_range", lambda v: v > 0.0, "a number > 0"),
    ("config.ddpo.adv_clip", lambda v: v >= 0.0, "a number >= 0 (0 = off)"),
    ("config.ddpo.inner_epochs", lambda v: v >= 1, "an integer >= 1"),
    ("config.ddpo.minibatch_size", lambda v: v >= 1, "an integer >= 1"),
    ("config.ddpo.learning_rate", lambda v: v >= 0.0, "a number >= 0 (0 = policy.learning_rate)"),
    ("config.ddpo.gradient_accumulation", lambda v: v >= 1, "an integer >= 1"),
    ("config.ddpo.stat_buffer", lambda v: v >= 0, "an integer >= 0 (0 = this epoch's rewards)"),
    ("config.ddpo.stat_min_count", lambda v: v >= 1, "an integer >= 1"),
    ("config.ddpo.reduce", lambda v: v in DDPO_REDUCTIONS, f"one of {', '.join(DDPO_REDUCTIONS)}"),
    ("config.grpo.group_size", lambda v: v >= 2, "an integer >= 2"),
    ("config.grpo.beta", lambda v: v >= 0.0, "a number >= 0 (0 = no KL)"),
    ("config.grpo.train_fraction", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("config.draft.grad_depth", lambda v: v >= 1, "an integer >= 1"),
    ("config.draft.beta", lambda v: v >= 0.0, "a number >= 0"),
    ("config.train.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("config.train.eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("config.train.max_nonfinite_in_a_row", lambda v: v >= 1, "an integer >= 1"),
    ("config.mesh.data", lambda v: v == -1 or v >= 1, "-1 (all remaining devices) or >= 1"),
    ("config.mesh.fsdp", lambda v: v == -1 or v >= 1, "-1 (all remaining devices) or >= 1"),
    ("config.mesh.num_processes", lambda v: v >= 0, "an integer >= 0 (0 = detected)"),
    ("config.mesh.process_id", lambda v: v >= -1, "an integer >= -1 (-1 = detected)"),
    ("config.mesh.cpu_devices", lambda v: v >= 0, "an integer >= 0 (0 = automatic)"),
    ("config.checkpoint.every", lambda v: v >= 1, "an integer >= 1"),
    ("config.checkpoint.keep", lambda v: v >= 1, "an integer >= 1"),
    ("config.logging.grid_columns", lambda v: v >= 1, "an integer >= 1"),
    ("config.logging.wandb_mode", lambda v: v in WANDB_MODES,
     "one of online, offline, disabled, or \"\" (WANDB_MODE)"),
)


def _check_values(config: ml_collections.ConfigDict) -> None:
    for path, allowed, description in _RULES:
        value = _get(config, path)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path} = {value!r}: must be finite; allowed: {description}")
        if not allowed(value):
            raise ConfigError(f"{path} = {value!r}: not allowed; must be {description}")
    steps = config.sample.num_steps
    if config.algorithm in PPO_ALGORITHMS and config.sample.eta <= 0.0:
        raise ConfigError(f"config.sample.eta = {config.sample.eta!r}: {config.algorithm} needs "
                          "eta > 0 (a deterministic step has no log-probability)")
    if config.pretrained.resolution and config.pretrained.family != "stable_diffusion":
        raise ConfigError(f"config.pretrained.resolution = {config.pretrained.resolution}: only "
                          "Stable Diffusion samples at another size; the "
                          f"{config.pretrained.family} family has one (set it to 0)")
    if config.algorithm == "grpo" and config.sample.batch_size % config.grpo.group_size:
        raise ConfigError(f"config.grpo.group_size = {config.grpo.group_size}: must divide "
                          f"sample.batch_size = {config.sample.batch_size} (whole groups a batch)")
    if config.algorithm == "draft" and config.draft.grad_depth > steps:
        raise ConfigError(f"config.draft.grad_depth = {config.draft.grad_depth}: must be at "
                          f"most sample.num_steps = {steps}")
    depth = config.policy.grad_depth
    if not 1 <= depth <= steps:
        raise ConfigError(f"config.policy.grad_depth = {depth!r}: must be in [1, sample.num_steps"
                          f" = {steps}] (K = num_steps is full backpropagation)")


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
    """(data, fsdp) sizes with -1 ("the rest of the devices") resolved; raises ConfigError."""
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if data == -1 and fsdp == -1:
        raise ConfigError("config.mesh: mesh.data and mesh.fsdp are both -1; set one of them")
    for name, size, other in (("fsdp", fsdp, data), ("data", data, fsdp)):
        if other == -1 and device_count % size:
            raise ConfigError(f"config.mesh.{name} = {size}: does not divide the {device_count} "
                              f"devices, so -1 cannot take the rest; use a divisor of "
                              f"{device_count}")
    data = device_count // fsdp if data == -1 else data
    fsdp = device_count // data if fsdp == -1 else fsdp
    if data * fsdp > device_count:
        raise ConfigError(f"config.mesh = (data={data}, fsdp={fsdp}): needs {data * fsdp} "
                          f"devices, more than the {device_count} available; shrink an axis or "
                          "set it to -1")
    return data, fsdp


def check_distributed(config: ml_collections.ConfigDict) -> None:
    """The multi-process fields of ``config.mesh`` (checked before ``jax.distributed`` starts)."""
    mesh = config.mesh
    address = mesh.coordinator_address
    if address and not (":" in address and address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"config.mesh.coordinator_address = {address!r}: must be host:port "
                          "(or \"\" to detect it)")
    if mesh.num_processes > 0 and mesh.process_id >= mesh.num_processes:
        raise ConfigError(f"config.mesh.process_id = {mesh.process_id}: must be below "
                          f"mesh.num_processes = {mesh.num_processes}")


def data_sharded_batches(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The batch sizes split over the data axis (each must be divisible by its size), by path."""
    return {path: _get(config, path) for path in (
        "config.sample.batch_size", "config.sample.eval_batch_size", "config.value.batch_size")}


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Raises ConfigError (one line) for the first field that cannot run."""
    check_schema(config)
    _check_values(config)
    check_distributed(config)
    data, _ = mesh_shape(config, device_count)
    for path, value in data_sharded_batches(config).items():
        if value % data:
            raise ConfigError(f"{path} = {value}: must be divisible by the {data} devices of the "
                              f"data axis (mesh.data); use a multiple of {data} or another mesh")
    from vard_jax.rewards import registry  # late: the registry imports model code

    try:
        registry.parse_spec(config.reward.name)
    except ValueError as error:
        raise ConfigError(f"config.reward.name = {config.reward.name!r}: {error}") from None
    for name in filter(None, (n.strip() for n in config.reward.eval_extra.split(","))):
        try:
            registry.parse_spec(name)
        except ValueError as error:
            raise ConfigError(f"config.reward.eval_extra = {config.reward.eval_extra!r}: "
                              f"{error}") from None
