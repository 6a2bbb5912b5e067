"""Rectified-flow (flow-matching) sampling: the sigma grid and the Euler / SDE step.

A flow model predicts the velocity v = eps - x_0 of the straight path
    x_sigma = (1 - sigma) x_0 + sigma eps,      sigma: 1 (noise) -> 0 (data),
so from a state and a velocity
    x0_hat = x_sigma - sigma v,     eps_hat = x_sigma + (1 - sigma) v.

Step i goes from sigma_i to sigma_{i+1} (dt = sigma_{i+1} - sigma_i < 0). With noise level
a (``eta`` in the rollout; Flow-GRPO's ``noise_level``) and
    s_i = a sqrt(sigma_i / (1 - sigma_i))      (sigma_i = 1 uses the grid's second sigma)
the stochastic step with the same marginals as the ODE is
    mean   = x (1 + s_i^2 dt / (2 sigma_i)) + v (1 + s_i^2 (1 - sigma_i) / (2 sigma_i)) dt
    x_next = mean + s_i sqrt(-dt) z,
a Gaussian kernel with a per-step log-density (what GRPO-style policy gradients need); a = 0
is the Euler step x + v dt of the ODE.

The grid follows diffusers' ``FlowMatchEulerDiscreteScheduler`` (``scheduler_config.json``):
T sigmas evenly spaced in t between the training schedule's ends, then shifted,
sigma' = shift sigma / (1 + (shift - 1) sigma) (Stable Diffusion 3: shift 3), or, with
``use_dynamic_shifting``, by a resolution-dependent mu (FLUX); a final sigma of 0. The model
reads the timestep sigma * num_train_timesteps (a float). The tests compare the grid with
diffusers'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion.ddim import StepOutput

#: scheduler_config.json fields that change the grid in ways this module does not implement.
_UNSUPPORTED = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "stochastic_sampling": False}


class FlowConfigError(ValueError):
    """A flow-matching scheduler config this module cannot follow."""


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """The flow-matching training schedule and its timestep shift (diffusers' field names)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # exponential | linear (dynamic shifting only)

    @classmethod
    def from_diffusers(cls, scheduler_config: Mapping[str, Any],
                       where: str = "scheduler_config.json") -> "FlowMatchConfig":
        """Reads a ``FlowMatchEulerDiscreteScheduler`` config; options that would change the
        grid in ways not implemented here stop with one line naming the field."""
        for name, default in _UNSUPPORTED.items():
            value = scheduler_config.get(name, default)
            if value not in (default, None, False):
                raise FlowConfigError(f"{where}: {name} = {value!r} is not supported (the flow "
                                      f"grid here implements shift and dynamic shifting only)")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in scheduler_config.items() if k in names and v is not None}
        config = cls(**values)
        if config.time_shift_type not in ("exponential", "linear"):
            raise FlowConfigError(f"{where}: time_shift_type = {config.time_shift_type!r}: use "
                                  "'exponential' or 'linear'")
        return config

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for ``image_seq_len`` latent tokens: linear between
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len
                                                      - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len


@flax.struct.dataclass
class FlowSchedule:
    """T flow steps; index i = 0 is the noisiest. float32 arrays.

    ``timesteps`` are what the model reads (sigma * num_train_timesteps, floats);
    ``prev_timesteps`` where each step lands (0 after the last step: sigma = 0, clean).
    """

    sigmas: jax.Array  # [T] sigma_i
    sigma_prev: jax.Array  # [T] sigma_{i+1}, the sigma each step lands on (0 last)
    timesteps: jax.Array  # [T] sigma_i * num_train_timesteps
    prev_timesteps: jax.Array  # [T] sigma_{i+1} * num_train_timesteps
    # The sigma the SDE's noise scale uses where sigma = 1 (s_i would be infinite there): the
    # grid's second sigma, as Flow-GRPO does.
    sigma_cap: jax.Array  # []
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    # --- the step interface the rollout calls (``vard_jax.diffusion.schedule.Schedule``) ---
    def noise_scale(self, i: jax.Array | int, eta: float) -> jax.Array:
        """s_i = eta sqrt(sigma_i / (1 - sigma_i)), the SDE's diffusion coefficient."""
        sigma = self.sigmas[i]
        capped = jnp.where(sigma >= 1.0, self.sigma_cap, sigma)
        return eta * jnp.sqrt(sigma / (1.0 - capped))

    def std(self, i: jax.Array | int, eta: float) -> jax.Array:
        """The standard deviation of step i's kernel, s_i sqrt(-dt) (0 for the Euler step)."""
        return self.noise_scale(i, eta) * jnp.sqrt(self.sigmas[i] - self.sigma_prev[i])

    def step(self, i: jax.Array | int, x_t: jax.Array, output: jax.Array,
             noise: Optional[jax.Array], eta: float,
             eps_shift: Optional[jax.Array] = None) -> StepOutput:
        """Step i from ``x_t`` with the model's velocity ``output``; ``noise`` is z_i, or None
        for the mean. ``eps_shift`` is added to the noise prediction eps_hat (the velocity
        moves by eps_shift / (1 - sigma_i), x0_hat by -sigma_i / (1 - sigma_i) eps_shift):
        value guidance in the parametrisation DDIM's steering uses."""
        sigma, sigma_next = self.sigmas[i], self.sigma_prev[i]
        v = output
        if eps_shift is not None:
            v = v + eps_shift / jnp.maximum(1.0 - sigma, 1e-6)
        dt = sigma_next - sigma
        s = self.noise_scale(i, eta)
        mean = (x_t * (1.0 + s**2 / (2.0 * sigma) * dt)
                + v * (1.0 + s**2 * (1.0 - sigma) / (2.0 * sigma)) * dt)
        std = s * jnp.sqrt(-dt)
        x_prev = mean if noise is None else mean + std * noise
        return StepOutput(x_prev=x_prev, mean=mean, std=std, x0_hat=x_t - sigma * v,
                              eps=x_t + (1.0 - sigma) * v)

    def distance_scale(self, i: jax.Array | int) -> jax.Array:
        """The KL distance of VARD is on velocities: 1."""
        del i
        return jnp.ones((), jnp.float32)

    def noise_level(self, i: jax.Array | int) -> jax.Array:
        """The coefficient of eps in x_t: sigma_i."""
        return self.sigmas[i]

    def x0_at(self, timesteps: jax.Array, x: jax.Array, output: jax.Array) -> jax.Array:
        """x0_hat = x - sigma v for per-sample model timesteps [B] (0: clean, x itself)."""
        sigma = (jnp.maximum(timesteps, 0) / self.num_train_timesteps).astype(x.dtype)
        return x - sigma.reshape((-1,) + (1,) * (x.ndim - 1)) * output


def _time_shift(config: FlowMatchConfig, mu: float, sigmas: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return mu / (mu + (1.0 / sigmas - 1.0))


def sigma_grid(config: FlowMatchConfig, num_steps: int,
               image_seq_len: Optional[int] = None) -> np.ndarray:
    """[T + 1] float32 sigmas of a T-step sampler, ending with 0 (diffusers' ``set_timesteps``
    without custom sigmas)."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps = {num_steps} must be in [1, {n}] (num_train_timesteps)")
    # The training schedule's ends: sigma 1 and, shifted unless shifting is dynamic, 1 / n.
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
    if not config.use_dynamic_shifting:
        train = config.shift * train / (1 + (config.shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    if config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("use_dynamic_shifting: the grid depends on the image size; pass "
                             "image_seq_len (latent tokens)")
        sigmas = _time_shift(config, config.mu(image_seq_len), sigmas)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    sigmas = sigmas.astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def make_flow_schedule(config: FlowMatchConfig, num_steps: int,
                       image_seq_len: Optional[int] = None) -> FlowSchedule:
    """The T-step flow grid (module docstring)."""
    grid = sigma_grid(config, num_steps, image_seq_len)
    n = config.num_train_timesteps
    sigmas, sigma_prev = grid[:-1], grid[1:]
    cap = grid[1]  # the second sigma (0 for a one-step grid: s = eta there)
    return FlowSchedule(sigmas=jnp.asarray(sigmas), sigma_prev=jnp.asarray(sigma_prev),
                        timesteps=jnp.asarray(sigmas * n, jnp.float32),
                        prev_timesteps=jnp.asarray(sigma_prev * n, jnp.float32),
                        sigma_cap=jnp.asarray(cap, jnp.float32), num_train_timesteps=n)


def add_noise(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """The straight path x_sigma = (1 - sigma) x0 + sigma eps for a batch of sigmas [B]."""
    s = sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise
