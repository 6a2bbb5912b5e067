"""The reward registry: rewards are looked up by name and built by factories.

A ``Reward`` is a pure function of final images and prompts, with metadata:

* ``jittable`` rewards take device arrays: ``score(images [B,H,W,3] in [0,1], prepared) -> [B]``
  where ``prepared = reward.prepare(prompts)`` (the reward's own tokenisation, done on the
  host). They run inside jit; ``differentiable`` ones may be differentiated (DRaFT, VARD's
  optional direct last step, the reward-initialised value).
* host rewards take numpy: ``score(images np [B,H,W,3], prompts list[str]) -> np [B]``. They
  never enter jit or a gradient: VARD uses them in the value stage only.

``"a:1.0,b:0.1"`` is a weighted sum of registered rewards; it is itself a Reward (host-side
if any part is), and reports each part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What factories may need: the loaded model family's assets and the reward config."""

    path: str = ""  # reward.path: a hub id or local directory ("" = the reward's default)
    world_clip: Optional[tuple[Any, Any, Any]] = None  # shapes world (FlaxCLIPModel, params, tokenizer)


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
    name: str
    score: Callable[..., Any]
    differentiable: bool
    jittable: bool
    prepare: Callable[[Sequence[str]], Any] = lambda prompts: list(prompts)
    parts: tuple[tuple["Reward", float], ...] = ()  # for weighted sums
    # For networks that can initialise a value model: (model, params, score(params, images,
    # prepared) -> [B]), the reward as a function of its own weights.
    backbone: Optional[tuple[Any, Any, Callable[..., Any]]] = None


_FACTORIES: dict[str, Callable[[RewardContext], Reward]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str) -> Callable:
    """Decorator: registers ``factory(context) -> Reward`` under ``name``."""
    def wrap(factory: Callable[[RewardContext], Reward]) -> Callable[[RewardContext], Reward]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is registered twice")
        _FACTORIES[name] = factory
        _DESCRIPTIONS[name] = description
        return factory
    return wrap


def names() -> list[str]:
    return sorted(_FACTORIES)


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"a"`` or ``"a:1.0,b:0.1"`` -> [(name, weight)]; raises ValueError naming the problem."""
    items = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError("empty reward name in the list")
        name, _, weight_text = part.partition(":")
        name = name.strip()
        if name not in _FACTORIES:
            raise ValueError(f"unknown reward {name!r}; registered: {', '.join(sorted(_FACTORIES))}")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"weight {weight_text!r} of reward {name!r} is not a number") from None
        items.append((name, weight))
    if len({n for n, _ in items}) != len(items):
        raise ValueError("a reward is named twice")
    return items


def build(spec: str, context: RewardContext) -> Reward:
    """The reward (or weighted sum) named by ``spec``."""
    items = parse_spec(spec)
    if len(items) == 1 and items[0][1] == 1.0:
        return _FACTORIES[items[0][0]](context)
    parts = tuple((_FACTORIES[name](context), weight) for name, weight in items)
    return weighted_sum(parts)


def weighted_sum(parts: tuple[tuple[Reward, float], ...]) -> Reward:
    jittable = all(r.jittable for r, _ in parts)
    differentiable = jittable and all(r.differentiable for r, _ in parts)
    name = ",".join(f"{r.name}:{w:g}" for r, w in parts)

    def prepare(prompts):
        return [r.prepare(prompts) for r, _ in parts]

    def score(images, prepared):
        total = 0.0
        for (reward, weight), data in zip(parts, prepared):
            total = total + weight * reward.score(images, data)
        return total

    return Reward(name=name, score=score, differentiable=differentiable, jittable=jittable,
                  prepare=prepare, parts=parts)


class RewardError(ValueError):
    """A reward that raised or returned something unusable; one line naming the reward."""


class RewardEvaluator:
    """Evaluates a reward on a batch outside of any gradient, checking what it returns.

    Returns numpy ``[B]`` totals and ``{part name: [B]}``; a reward returning the wrong shape,
    a non-finite value or raising gives one RewardError (a ValueError) line naming the reward.
    """

    def __init__(self, reward: Reward):
        self.reward = reward
        self._jitted: dict[str, Callable] = {}

    def _score_one(self, reward: Reward, images, prompts: Sequence[str]) -> np.ndarray:
        prepared = reward.prepare(prompts)
        try:
            if reward.jittable:
                fn = self._jitted.setdefault(reward.name, jax.jit(reward.score))
                values = np.asarray(fn(images, prepared))
            else:
                values = np.asarray(reward.score(np.asarray(images, np.float32), list(prompts)))
        except Exception as error:  # noqa: BLE001 - re-raised as one clear line
            raise RewardError(f"reward {reward.name!r} raised {type(error).__name__}: {error}") from error
        batch = len(prompts)
        if values.shape != (batch,):
            raise RewardError(f"reward {reward.name!r} returned shape {values.shape}; expected ({batch},)")
        if not np.issubdtype(values.dtype, np.number):
            raise RewardError(f"reward {reward.name!r} returned dtype {values.dtype}; expected numbers")
        if not np.all(np.isfinite(values)):
            raise RewardError(f"reward {reward.name!r} returned non-finite values "
                             f"{values[~np.isfinite(values)][:4].tolist()}")
        return values.astype(np.float32)

    def __call__(self, images, prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if not self.reward.parts:
            values = self._score_one(self.reward, images, prompts)
            return values, {self.reward.name: values}
        parts = {r.name: self._score_one(r, images, prompts) for r, _ in self.reward.parts}
        total = sum(w * parts[r.name] for r, w in self.reward.parts)
        return np.asarray(total, np.float32), parts
