"""The value at sampling time: value-gradient guidance and value-steered (SMC) sampling.

A value V(x, t, c) predicts the standardised final reward r of a chain from its state x at
timestep t; VARD trains one for any reward, differentiable or not. Two ways to sample towards
high reward with it, with or without fine-tuning:

Value guidance (classifier guidance with V as the log-likelihood). Sampling from the tilted
marginal p_t(x) exp(lambda V(x, t)) replaces the score s = -eps / sqrt(1 - a_t) by
s + lambda grad_x V, i.e. the noise prediction by

    eps' = eps - lambda sqrt(1 - a_t) grad_x V(x_t, t, c),

with a_t = alpha_bar(t); x0_hat and the DDIM step follow from eps' (``ddim.ddim_step``'s
``eps_shift``; for v-prediction models the shift is applied after converting to eps). For a
flow model x_t = (1 - sigma) x_0 + sigma eps, and the same tilt gives
eps' = eps - lambda sigma grad_x V: sqrt(1 - a_t) is the schedule's ``noise_level`` either way
(the flow step turns the eps shift into a velocity shift). lambda
(``scale``) 0 gives plain sampling exactly. V is trained on the states *after* each step, at
the timestep they land on; the pure-noise state entering step 0 is never among them, so
guidance starts at step 1.

Value-steered sampling (sequential Monte Carlo, a Feynman-Kac scheme). N particles per
prompt run the (optionally guided) sampler; after step i each particle's log-weight grows by
(V(x_{i-1}, tau_{i-1}) - V_last) / temperature, V_last being the value at its last weighting;
at the chosen steps the particles of each prompt are resampled in proportion to their weights
(systematic resampling) when their effective sample size is below ``ess_threshold * N``, and
the weights reset. The potentials telescope, so the final particles, weighted by their last
log-weights, target p(x_0 | c) exp(V(x_0) / temperature): the base model tilted towards high
value. It needs a stochastic sampler (eta > 0): a duplicated particle of a deterministic one
never diverges from its copy.

Best-of-N (the plain baseline beside both) draws N independent samples and keeps the best by
the reward or by V(x_0); ``best_of`` picks the indices.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import Schedule

# value_fn(x [B, ...], timesteps [B] int32) -> [B]: V with the prompt and parameters bound.
ValueFn = Callable[[jax.Array, jax.Array], jax.Array]


def value_guidance(value_fn: ValueFn, schedule: Schedule, scale: float,
                   first_step: int = 1) -> rollout_lib.EpsShift:
    """``eps_shift(x_t, i) = -scale sqrt(1 - a_t) grad_x V(x_t, tau_i)`` for the rollout
    (zero before ``first_step``; module docstring)."""

    def value_sum(x, timesteps):
        return jnp.sum(value_fn(x, timesteps))

    def eps_shift(x: jax.Array, i: jax.Array) -> jax.Array:
        timesteps = rollout_lib.step_timesteps(schedule.timesteps[i], x.shape[0])
        gradient = jax.grad(value_sum)(x, timesteps)
        shift = -scale * schedule.noise_level(i) * gradient
        return jnp.where(i >= first_step, shift, jnp.zeros_like(shift))

    return eps_shift


class SteeredSamples(NamedTuple):
    """The particles at the end of a value-steered rollout, prompt-major ([P * N, ...])."""

    x0: jax.Array  # [P * N, ...] final samples
    log_weights: jax.Array  # [P * N] log-weights since the last resampling (incl. V(x_0))
    final_value: jax.Array  # [P * N] V(x_0) (standardised reward units)
    ess: jax.Array  # [T, P] effective sample size of each prompt's particles after step i,
    #                 before any resampling there
    resampled: jax.Array  # [T, P] bool: the particles of prompt p were resampled after step i


def resampling_steps(num_steps: int, every: int) -> np.ndarray:
    """[T] bool: the steps after which particles may be resampled: every ``every`` steps,
    never after the last one (the final weights are returned instead). ``every`` = 0: never."""
    if every < 0:
        raise ValueError(f"resample_every = {every}: use 0 (never) or a number of steps >= 1")
    steps = np.arange(num_steps)
    if every == 0:
        return np.zeros(num_steps, bool)
    return ((steps + 1) % every == 0) & (steps < num_steps - 1)


def effective_sample_size(log_weights: jax.Array) -> jax.Array:
    """ESS = (sum w)^2 / sum w^2 over the last axis, from log-weights (between 1 and N)."""
    w = jax.nn.softmax(log_weights, axis=-1)
    return 1.0 / jnp.sum(w**2, axis=-1)


def systematic_ancestors(key: jax.Array, log_weights: jax.Array) -> jax.Array:
    """Systematic resampling of each row of ``log_weights`` [P, N]: ancestor indices [P, N]
    in 0..N-1, particle j chosen floor(N w_j) or ceil(N w_j) times."""
    groups, n = log_weights.shape
    w = jax.nn.softmax(log_weights, axis=-1)
    cumulative = jnp.cumsum(w, axis=-1)
    cumulative = cumulative.at[:, -1].set(1.0)  # exact end despite rounding
    u = jax.random.uniform(key, (groups, 1))
    positions = (u + jnp.arange(n)[None, :]) / n
    ancestors = jax.vmap(lambda c, p: jnp.searchsorted(c, p, side="right"))(cumulative,
                                                                            positions)
    return jnp.minimum(ancestors, n - 1)


def steered_rollout(eps_fn: ddim.EpsFn, params, schedule: Schedule, x_T: jax.Array,
                    noise: jax.Array, context: jax.Array, null_context: jax.Array,
                    value_fn: ValueFn, key: jax.Array, *, particles: int, eta: float,
                    guidance_scale: float, temperature: float = 1.0, resample_every: int = 1,
                    ess_threshold: float = 1.0,
                    eps_shift: Optional[rollout_lib.EpsShift] = None) -> SteeredSamples:
    """Value-steered sampling of ``x_T.shape[0] // particles`` prompts (module docstring).

    Rows are prompt-major: rows p*N .. p*N+N-1 are the particles of prompt p (their
    ``context`` rows must be equal). ``noise`` [P*N, T, ...] are the steps' z_i, ``key`` draws
    the resampling. Each step is ``rollout.denoising_step``, the rollout's own.
    """
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: must be > 0")
    batch = x_T.shape[0]
    if particles < 1 or batch % particles:
        raise ValueError(f"{batch} rows are not a whole number of groups of {particles} "
                         "particles")
    groups = batch // particles
    scheduled = jnp.asarray(resampling_steps(schedule.num_steps, resample_every))
    noise_time_major = jnp.swapaxes(noise, 0, 1)

    def body(carry, inputs):
        x, log_w, v_last = carry
        i, z = inputs
        info = rollout_lib.denoising_step(eps_fn, params, schedule, x, i, z, context,
                                          null_context, eta=eta, guidance_scale=guidance_scale,
                                          eps_shift=eps_shift)
        landed = rollout_lib.step_timesteps(schedule.prev_timesteps[i], batch)
        v = value_fn(info.x_prev, landed).astype(jnp.float32)
        log_w = log_w + (v - v_last) / temperature
        grouped = log_w.reshape(groups, particles)
        ess = effective_sample_size(grouped)
        resample = scheduled[i] & (ess < ess_threshold * particles)  # [P]
        ancestors = systematic_ancestors(jax.random.fold_in(key, i), grouped)
        ancestors = jnp.where(resample[:, None], ancestors, jnp.arange(particles)[None, :])
        rows = (ancestors + particles * jnp.arange(groups)[:, None]).reshape(-1)
        reset = jnp.repeat(resample, particles)
        x_next = info.x_prev[rows]
        log_w = jnp.where(reset, 0.0, log_w)
        return (x_next, log_w, v[rows]), (ess, resample)

    init = (x_T, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    indices = jnp.arange(schedule.num_steps, dtype=jnp.int32)
    (x0, log_w, v_final), (ess, resampled) = jax.lax.scan(body, init,
                                                          (indices, noise_time_major))
    return SteeredSamples(x0=x0, log_weights=log_w, final_value=v_final, ess=ess,
                          resampled=resampled)


def best_of(scores: jax.Array | np.ndarray, group: int) -> np.ndarray:
    """Row indices of the highest score in each consecutive group of ``group`` rows."""
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] % group:
        raise ValueError(f"{scores.shape} scores are not groups of {group}")
    best = np.argmax(scores.reshape(-1, group), axis=1)
    return best + group * np.arange(best.shape[0])


def weighted_mean(values: jax.Array | np.ndarray, log_weights: jax.Array | np.ndarray,
                  group: int) -> np.ndarray:
    """Per group of ``group`` rows, the self-normalised weighted mean of ``values``: the
    expectation of a statistic under the steered distribution (one value per prompt)."""
    values = np.asarray(values, np.float64).reshape(-1, group)
    log_w = np.asarray(log_weights, np.float64).reshape(-1, group)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    return np.sum(w * values, axis=1) / np.sum(w, axis=1)


def draw_one(key: jax.Array, log_weights: jax.Array, group: int) -> jax.Array:
    """One row per group drawn in proportion to its weight: row indices [P]."""
    grouped = jnp.reshape(log_weights, (-1, group))
    choice = jax.random.categorical(key, grouped, axis=-1)
    return choice + group * jnp.arange(grouped.shape[0])
