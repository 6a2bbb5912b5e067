"""Low-rank adapters (LoRA) on the Dense layers of a Flax model, without changing the model.

A Dense layer ``y = x W + b`` whose module name is a target gets ``y += s (x A) B`` with
``A [in, r]``, ``B [r, out]`` and ``s = alpha / r``; ``B`` starts at zero, so the adapted model
starts equal to the base model. The adapters are a pytree of their own that mirrors the
module paths of the layers they adapt::

    {"down_blocks_0": {"attentions_0": {..., "to_q": {"a": [in, r], "b": [r, out]}}}}

Two ways to use them, which give the same outputs:

* unmerged (training): ``apply_unmerged`` runs the model under a Flax method interceptor that
  adds ``s (x A) B`` to each adapted Dense output. The base weights are only read, so a policy
  and its frozen reference share one copy of them, and gradients reach only ``A`` and ``B``
  (no ``[in, out]``-sized temporaries);
* merged (deployment): ``merge`` returns plain model params with ``W + s A B``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

#: The attention projections of diffusers' Flax attention (PyTorch: to_q, to_k, to_v, to_out.0).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = ATTENTION_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``"to_q, to_k"`` -> ``("to_q", "to_k")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def dense_layers(params: Any) -> dict[tuple[str, ...], tuple[int, int]]:
    """Module path -> (in, out) of every Dense layer (a 2-d ``kernel``) in ``params``."""
    layers = {}
    for path, leaf in flatten_dict(params).items():
        if path[-1] == "kernel" and len(leaf.shape) == 2:
            layers[path[:-1]] = tuple(leaf.shape)
    return layers


def target_layers(params: Any, targets: Sequence[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    """The Dense layers whose module name is one of ``targets``; an error when there are none."""
    layers = dense_layers(params)
    chosen = {path: shape for path, shape in layers.items() if path[-1] in set(targets)}
    if not chosen:
        names = sorted({path[-1] for path in layers})
        raise ValueError(f"policy.lora_targets {','.join(targets)!r} match no Dense layer of the "
                         f"model; its Dense layers are named {', '.join(names[:12])}")
    return chosen


def init(params: Any, spec: LoraSpec, key: jax.Array) -> dict:
    """Adapters for the target layers of ``params``: A ~ N(0, 1/in), B = 0 (float32)."""
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    layers = target_layers(params, spec.targets)
    flat = {}
    for index, (path, (fan_in, fan_out)) in enumerate(sorted(layers.items())):
        a = jax.random.normal(jax.random.fold_in(key, index), (fan_in, spec.rank), jnp.float32)
        flat[path + ("a",)] = a / jnp.sqrt(float(fan_in))
        flat[path + ("b",)] = jnp.zeros((spec.rank, fan_out), jnp.float32)
    return unflatten_dict(flat)


def _by_module(lora: Any) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    modules: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for path, leaf in flatten_dict(lora).items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def merge(params: Any, lora: Any, scale: float) -> Any:
    """Plain params with every adapted kernel replaced by ``W + scale * A B`` (in W's dtype)."""
    flat = dict(flatten_dict(params))
    for path, adapter in _by_module(lora).items():
        kernel = flat.get(path + ("kernel",))
        if kernel is None:
            raise ValueError(f"LoRA adapter {'/'.join(path)} has no Dense kernel in the params")
        delta = scale * (adapter["a"] @ adapter["b"])
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def apply_unmerged(fn: Callable[..., Any], lora: Any, scale: float) -> Callable[..., Any]:
    """``fn`` (which calls a Flax module) with the adapters added to its Dense outputs.

    The interceptor is active while ``fn`` traces or runs, so this composes with jit, grad,
    scan and remat. An adapter whose layer is never called is an error (a wrong tree).
    """
    modules = _by_module(lora)

    def wrapped(*args, **kwargs):
        if not modules:
            return fn(*args, **kwargs)
        used = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            output = next_fun(*call_args, **call_kwargs)
            if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
                return output
            adapter = modules.get(tuple(context.module.path))
            if adapter is None:
                return output
            used.add(tuple(context.module.path))
            x = call_args[0] if call_args else call_kwargs["inputs"]
            dtype = output.dtype
            low = jnp.matmul(x.astype(dtype), adapter["a"].astype(dtype))
            return output + (scale * jnp.matmul(low, adapter["b"].astype(dtype))).astype(dtype)

        with nn.intercept_methods(interceptor):
            result = fn(*args, **kwargs)
        unused = set(modules) - used
        if unused:
            raise ValueError(f"LoRA adapters for layers the model never called: "
                             f"{', '.join('/'.join(p) for p in sorted(unused)[:3])}")
        return result

    return wrapped


def count(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))
