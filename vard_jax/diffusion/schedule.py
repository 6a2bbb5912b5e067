"""Noise schedules and the DDIM timestep grid, as a pytree of arrays.

Conventions follow diffusers' DDIM schedulers so that a Stable Diffusion scheduler config
(``scheduler_config.json``) means the same thing here: "leading" timestep spacing plus
``steps_offset``, and the alpha_bar used after the last step is 1 (``set_alpha_to_one``) or
alpha_bar[0].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """The training noise schedule and the sampler's options (diffusers' field names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample

    @classmethod
    def from_diffusers(cls, scheduler_config: Mapping[str, Any]) -> "NoiseScheduleConfig":
        """Reads the fields we use from a diffusers scheduler config dict; ignores the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in scheduler_config.items() if k in names}
        return cls(**values)


@flax.struct.dataclass
class DDIMSchedule:
    """The DDIM grid tau_T > ... > tau_1 with the alpha_bar values each step needs.

    Index i = 0 is the first (noisiest) step. All arrays are float32 except timesteps.
    """

    alphas_cumprod: jax.Array  # [num_train_timesteps]
    timesteps: jax.Array  # [T] int32, descending: the timestep each step denoises from.
    prev_timesteps: jax.Array  # [T] int32: the timestep each step lands on (< 0 after the last).
    alpha_t: jax.Array  # [T] alpha_bar(tau_i)
    alpha_prev: jax.Array  # [T] alpha_bar(tau_{i-1}); the final alpha after the last step.
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    # The derivative of the x0 clip: "exact" (zero outside the range) or "straight_through"
    # (identity; the forward values are the same). Only differentiated rollouts read it.
    clip_gradient: str = flax.struct.field(pytree_node=False, default="exact")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def betas_for(config: NoiseScheduleConfig) -> np.ndarray:
    """The training betas, in float64 numpy."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(time: float) -> float:
            return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"beta_schedule {config.beta_schedule!r} is not supported; use linear, "
                     "scaled_linear or squaredcos_cap_v2")


def alphas_cumprod_for(config: NoiseScheduleConfig) -> np.ndarray:
    """alpha_bar(t) for t = 0..num_train_timesteps-1, float32."""
    return np.cumprod(1.0 - betas_for(config)).astype(np.float32)


def make_ddim_schedule(config: NoiseScheduleConfig, num_steps: int) -> DDIMSchedule:
    """The DDIM grid of ``num_steps`` steps ("leading" spacing, as diffusers' DDIM)."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps = {num_steps} must be in [1, {n}] (num_train_timesteps)")
    alphas_cumprod = alphas_cumprod_for(config)
    step_ratio = n // num_steps
    timesteps = (np.arange(num_steps) * step_ratio)[::-1] + config.steps_offset
    prev_timesteps = timesteps - step_ratio
    final_alpha = 1.0 if config.set_alpha_to_one else float(alphas_cumprod[0])
    alpha_t = alphas_cumprod[timesteps]
    alpha_prev = np.where(prev_timesteps >= 0, alphas_cumprod[np.maximum(prev_timesteps, 0)],
                          final_alpha).astype(np.float32)
    return DDIMSchedule(
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        timesteps=jnp.asarray(timesteps, jnp.int32),
        prev_timesteps=jnp.asarray(prev_timesteps, jnp.int32),
        alpha_t=jnp.asarray(alpha_t, jnp.float32),
        alpha_prev=jnp.asarray(alpha_prev, jnp.float32),
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
        prediction_type=config.prediction_type,
    )


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
    """The forward process q(x_t | x_0) for a batch of timesteps; x0, noise: [B, ...]."""
    a = alphas_cumprod[timesteps].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
