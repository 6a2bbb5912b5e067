"""Sampling schedules: the ``Schedule`` interface the rollout steps through, the DDPM noise
schedule with its DDIM grid, and ``make_schedule`` for either family.

Two families implement ``Schedule``: ``DDIMSchedule`` (noise-prediction models: epsilon, v or
x0; the step in ``vard_jax.diffusion.ddim``) and ``flow.FlowSchedule`` (flow-matching models
predicting a velocity; Euler and SDE steps in ``vard_jax.diffusion.flow``). The rollout, the
algorithms and steering call only the interface.

DDIM conventions follow diffusers' DDIM schedulers so that a Stable Diffusion scheduler config
(``scheduler_config.json``) means the same thing here: "leading" timestep spacing plus
``steps_offset``, and the alpha_bar used after the last step is 1 (``set_alpha_to_one``) or
alpha_bar[0].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Protocol, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import ddim, flow


class Schedule(Protocol):
    """A T-step sampling grid; index i = 0 is the noisiest step.

    ``timesteps`` [T] are what the model reads at each step (int32 for DDPM models, float32
    for flow models), ``prev_timesteps`` [T] where each step lands (the value's timestep for
    the state after the step).
    """

    timesteps: jax.Array
    prev_timesteps: jax.Array

    @property
    def num_steps(self) -> int: ...

    def step(self, i: jax.Array | int, x_t: jax.Array, output: jax.Array,
             noise: Optional[jax.Array], eta: float,
             eps_shift: Optional[jax.Array] = None) -> ddim.StepOutput:
        """Step i from x_t given the model's (guided) output; ``noise`` z_i or None (mean)."""

    def std(self, i: jax.Array | int, eta: float) -> jax.Array:
        """The standard deviation of step i's Gaussian kernel (0: deterministic)."""

    def distance_scale(self, i: jax.Array | int) -> jax.Array:
        """The factor that turns a difference of model outputs at step i into the difference
        VARD's KL term measures (noise predictions; velocities for flow models)."""

    def noise_level(self, i: jax.Array | int) -> jax.Array:
        """The coefficient of the noise eps in x_t at step i (value guidance's scale)."""

    def x0_at(self, timesteps: jax.Array, x: jax.Array, output: jax.Array) -> jax.Array:
        """The one-step prediction x0_hat at per-sample model timesteps [B]; states after the
        last step (clean) pass through."""


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

    # --- the ``Schedule`` interface -------------------------------------------------------
    def step(self, i: jax.Array | int, x_t: jax.Array, output: jax.Array,
             noise: Optional[jax.Array], eta: float,
             eps_shift: Optional[jax.Array] = None) -> ddim.StepOutput:
        return ddim.ddim_step(self, i, x_t, output, noise, eta, eps_shift)

    def std(self, i: jax.Array | int, eta: float) -> jax.Array:
        return ddim.ddim_std(self, i, eta)

    def distance_scale(self, i: jax.Array | int) -> jax.Array:
        """d eps / d output (1 for epsilon-prediction models)."""
        return ddim.eps_per_output(self, self.alpha_t[i])

    def noise_level(self, i: jax.Array | int) -> jax.Array:
        return jnp.sqrt(1.0 - self.alpha_t[i])

    def x0_at(self, timesteps: jax.Array, x: jax.Array, output: jax.Array) -> jax.Array:
        """Clipped like the sampler's x0 (``clip_sample``; its derivative
        ``clip_gradient``); timesteps < 0 (after the last step) pass x through."""
        a = self.alphas_cumprod[jnp.maximum(timesteps, 0)].reshape((-1,) + (1,) * (x.ndim - 1))
        x0, _ = ddim.predict_x0_eps(self, a, x, output)
        return ddim.clip_x0(self, jnp.where((timesteps < 0).reshape(a.shape), x, x0))


def with_clip_gradient(schedule: Schedule, clip_gradient: str) -> Schedule:
    """The schedule whose x0 clip has the derivative ``clip_gradient`` (DDIM's
    ``clip_sample``; a flow schedule, which does not clip, is returned as it is)."""
    if isinstance(schedule, DDIMSchedule):
        return schedule.replace(clip_gradient=clip_gradient)
    return schedule


#: What ``Pipeline.schedule`` holds: the training schedule of a DDPM or a flow model.
ScheduleConfig = Union["NoiseScheduleConfig", flow.FlowMatchConfig]


def make_schedule(config: ScheduleConfig, num_steps: int,
                  image_seq_len: Optional[int] = None) -> Schedule:
    """The T-step sampling grid of a model's training schedule: DDIM for a DDPM schedule, the
    flow grid for a flow-matching one (``image_seq_len``: latent tokens, for dynamic
    shifting)."""
    if isinstance(config, flow.FlowMatchConfig):
        return flow.make_flow_schedule(config, num_steps, image_seq_len)
    return make_ddim_schedule(config, num_steps)


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

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                         for i in range(n)])
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
