"""The denoising loop: one ``jax.lax.scan`` over the steps of a ``Schedule`` (DDIM, or the
Euler/SDE step of a flow model), differentiable in the policy.

Sampling, evaluation and every training objective use this same scan. It returns the
whole trajectory batch-first, and it evaluates an optional per-step hook inside the loop
(where the value and KL terms of VARD plug in), so that per-step losses never need the
trajectory to be stored with gradients.

Gradient depth K: the state entering step i is ``stop_gradient``-ed at gradient cuts, so a
loss at step i sees the policy's influence through at most K steps.
  - ``grad_cut="window"`` (VARD): cuts before every K-th step (steps 0, K, 2K, ...): with
    K = 1 each step gets only its own local gradient; K = T is full backpropagation.
  - ``grad_cut="last"`` (DRaFT-K): one cut before step T - K: only the last K steps of the
    chain carry gradient. The steps before the cut run with ``stop_gradient``-ed parameters,
    so nothing computed there (hook outputs included) carries gradient and the backward pass
    skips them.

VARD's step subsampling (``vard_jax.algorithms.vard``) and AlignProp's drawn depth
(``vard_jax.algorithms.draft``) skip the backward work of untrained steps outside this scan:
the chain runs forward without gradient, and only the trained steps are differentiated again.

Static cuts (the usual case) split the chain into runs that each begin at a cut, and equal
runs share one scan: the state is ``stop_gradient``-ed *before* the UNet calls of a run's
first step, so the backward pass never differentiates them with respect to that state. A
traced ``cuts`` array (a depth drawn inside jit) selects the cut per step with ``where``
instead; that gives the same gradient but, in a loop, the backward pass still computes the
UNet's input gradient before the cut zeroes it (with K = 1 at Stable Diffusion 1.5 size,
~60% more peak memory and ~20% more FLOPs in XLA's analysis; experiments/sd_memory.py).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vard_jax.diffusion import ddim
from vard_jax.diffusion.schedule import Schedule

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The outputs of the UNet's resnet and transformer blocks are kept (named with
    # checkpoint_name in vard_jax/models/nn/unet.py); what is inside a block is recomputed.
    "blocks": jax.checkpoint_policies.save_only_these_names("resnet", "transformer"),
}


class StepInfo(NamedTuple):
    """What the per-step hook sees at step i (arrays of the current batch)."""

    index: jax.Array  # [] int32, 0 = the noisiest step
    timestep: jax.Array  # [] tau_i, the model's timestep (int32; float32 for flow models)
    prev_timestep: jax.Array  # [] tau_{i-1}, where the step lands (the last: clean)
    x_t: jax.Array  # [B, ...] state entering the step (after any gradient cut)
    x_prev: jax.Array  # [B, ...] state after the step
    eps: jax.Array  # [B, ...] guided noise prediction of the policy
    eps_cond: jax.Array  # [B, ...] the model's conditional output at x_t (eps, v, velocity)
    output: jax.Array  # [B, ...] the model's guided output (before any value-guidance shift)
    # [] output difference -> the difference VARD's KL measures: d eps / d output for DDPM
    # models (1 for eps-prediction, sqrt(alpha_bar) for v), 1 for flow velocities.
    distance_scale: jax.Array
    x0_hat: jax.Array  # [B, ...] one-step prediction of x_0
    mean: jax.Array  # [B, ...] mu_i
    std: jax.Array  # [] sigma_i


StepHook = Callable[[StepInfo], Any]
# eps_shift(x_t [B, ...], step index []) -> [B, ...], added to the guided noise prediction.
EpsShift = Callable[[jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
    """A batch of denoising chains, batch-first; T = number of steps."""

    x_t: jax.Array  # [B, T, ...] states entering each step
    x_prev: jax.Array  # [B, T, ...] states after each step
    timesteps: jax.Array  # [B, T] the model's timesteps (int32; float32 for flow models)
    noise: jax.Array  # [B, T, ...] z_i of each step
    log_prob: jax.Array  # [B, T] log p(x_prev | x_t) under the sampling policy
    x0: jax.Array  # [B, ...] final samples


def gradient_cuts(num_steps: int, grad_depth: Optional[int], mode: str = "window") -> np.ndarray:
    """[T] bool: where the state entering a step is stop_gradient-ed."""
    steps = np.arange(num_steps)
    if grad_depth is None or grad_depth >= num_steps:
        return np.zeros(num_steps, bool)
    if grad_depth < 1:
        raise ValueError(f"grad_depth = {grad_depth} must be >= 1")
    if mode == "window":
        return steps % grad_depth == 0
    if mode == "last":
        return steps == num_steps - grad_depth
    raise ValueError(f"grad_cut mode {mode!r}: use 'window' or 'last'")


def segments(cuts: np.ndarray) -> list[tuple[int, int, int, bool]]:
    """Static cuts -> runs of steps ``(start, length, repeats, cut_first)``.

    The chain is split before every cut; consecutive runs of equal length and kind are merged
    into one entry repeated ``repeats`` times (one scan over them). ``cut_first`` says whether
    the state entering each run is cut. E.g. window K = 1, T = 50: [(0, 1, 50, True)];
    last K = 3, T = 10: [(0, 7, 1, False), (7, 3, 1, True)].
    """
    cuts = np.asarray(cuts, bool)
    starts = sorted({0} | set(np.flatnonzero(cuts).tolist()))
    groups: list[tuple[int, int, int, bool]] = []
    for start, end in zip(starts, starts[1:] + [len(cuts)]):
        length, cut = end - start, bool(cuts[start])
        if groups and groups[-1][1] == length and groups[-1][3] == cut:
            first, _, repeats, _ = groups[-1]
            groups[-1] = (first, length, repeats + 1, cut)
        else:
            groups.append((start, length, 1, cut))
    return groups


def step_timesteps(t: jax.Array, batch: int) -> jax.Array:
    """[B] copies of one step's model timestep, in the schedule's dtype."""
    return jnp.full((batch,), t, jnp.asarray(t).dtype)


def denoising_step(eps_fn: ddim.EpsFn, params: Any, schedule: Schedule, x: jax.Array,
                   i: jax.Array, z: jax.Array, context: jax.Array, null_context: jax.Array, *,
                   eta: float, guidance_scale: float,
                   eps_shift: Optional[EpsShift] = None) -> StepInfo:
    """Step i of ``schedule`` from x ([B, ...]) with the input noise z, as the rollout takes it.

    ``eps_shift(x, i) -> [B, ...]`` is added to the guided noise prediction (value guidance,
    ``vard_jax.diffusion.steering``); it is a sampling-time term, constant for gradients.
    """
    t = schedule.timesteps[i]
    guided, eps_cond = ddim.guided_and_conditional_eps(
        eps_fn, params, x, step_timesteps(t, x.shape[0]), context, null_context,
        guidance_scale)
    shift = None if eps_shift is None else jax.lax.stop_gradient(eps_shift(x, i))
    step = schedule.step(i, x, guided, z, eta, eps_shift=shift)
    return StepInfo(index=i, timestep=t, prev_timestep=schedule.prev_timesteps[i], x_t=x,
                    x_prev=step.x_prev, eps=step.eps, eps_cond=eps_cond, output=guided,
                    distance_scale=schedule.distance_scale(i), x0_hat=step.x0_hat,
                    mean=step.mean, std=step.std)


def states_until(eps_fn: ddim.EpsFn, params: Any, schedule: Schedule, x_T: jax.Array,
                 noise: jax.Array, context: jax.Array, null_context: jax.Array,
                 last: jax.Array, *, eta: float, guidance_scale: float) -> jax.Array:
    """The states x_t entering steps 0..``last`` of the chain, [T, B, ...] (zeros after ``last``),
    computed forward only (a ``lax.while_loop`` that stops after step ``last`` - 1; ``last``
    may be traced). Not differentiable: give it constant (``stop_gradient``-ed) parameters."""
    noise_time_major = jnp.swapaxes(noise, 0, 1)  # [T, B, ...]

    def body(carry):
        i, x, states = carry
        states = states.at[i].set(x)
        info = denoising_step(eps_fn, params, schedule, x, i, noise_time_major[i], context,
                              null_context, eta=eta, guidance_scale=guidance_scale)
        return i + 1, info.x_prev, states

    states = jnp.zeros((schedule.num_steps,) + x_T.shape, x_T.dtype)
    i, x, states = jax.lax.while_loop(lambda carry: carry[0] < last, body,
                                      (jnp.int32(0), x_T, states))
    return states.at[i].set(x)


def rollout(
    eps_fn: ddim.EpsFn,
    params: Any,
    schedule: Schedule,
    x_T: jax.Array,
    noise: jax.Array,
    context: jax.Array,
    null_context: jax.Array,
    *,
    eta: float,
    guidance_scale: float,
    grad_depth: Optional[int] = None,
    grad_cut: str = "window",
    remat: str = "none",
    step_hook: Optional[StepHook] = None,
    python_loop: bool = False,
    cuts: Optional[jax.Array] = None,
    unroll: int | bool = 1,
    eps_shift: Optional[EpsShift] = None,
) -> tuple[Trajectory, Any]:
    """Runs the chain from x_T; returns (trajectory, stacked hook outputs or None).

    Args:
      eps_fn: ``eps_fn(params, x, timesteps, context)``, the model (noise, v or velocity).
      params: its (differentiable) parameters.
      schedule: the sampling grid (T steps): a DDIM or a flow schedule.
      x_T: [B, ...] initial noise.
      noise: [B, T, ...] the z_i of every step (reparameterised sampling).
      context: [B, L, D] prompt embeddings; null_context: [1 or B, L, D] the empty prompt's.
      eta, guidance_scale: the steps' stochasticity (DDIM's eta; a flow SDE's noise level)
        and the classifier-free guidance weight.
      grad_depth, grad_cut: gradient depth K and where to cut (module docstring).
      remat: rematerialisation policy of the step body: none | full | dots.
      step_hook: ``hook(StepInfo) -> pytree``; its outputs are stacked to [T, ...].
      python_loop: run the same body in a Python loop (debugging, inspection).
      cuts: optional [T] bool array (may be traced) that replaces ``gradient_cuts(T, K, mode)``,
        e.g. for a depth drawn inside jit (AlignProp).
      unroll: ``lax.scan``'s unroll (True = full); see ``resolve_unroll``.
      eps_shift: optional ``fn(x_t, i) -> [B, ...]`` added to the guided noise prediction of
        every step (value guidance; ``vard_jax.diffusion.steering.value_guidance``).
    """
    num_steps = schedule.num_steps
    if noise.shape[:2] != (x_T.shape[0], num_steps):
        raise ValueError(f"noise has shape {noise.shape}; expected [B={x_T.shape[0]}, "
                         f"T={num_steps}, ...]")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    traced_cuts = cuts is not None
    if not traced_cuts:
        static_cuts = gradient_cuts(num_steps, grad_depth, grad_cut)
    batch = x_T.shape[0]

    def step_fn(params: Any, x: jax.Array, inputs: tuple[jax.Array, jax.Array]):
        i, z = inputs
        if traced_cuts:
            x = jnp.where(cuts[i], jax.lax.stop_gradient(x), x)
        info = denoising_step(eps_fn, params, schedule, x, i, z, context, null_context,
                              eta=eta, guidance_scale=guidance_scale, eps_shift=eps_shift)
        log_prob = ddim.gaussian_log_prob(jax.lax.stop_gradient(info.x_prev), info.mean, info.std)
        hook_out = None if step_hook is None else step_hook(info)
        return info.x_prev, (x, info.x_prev, log_prob, hook_out)

    if remat != "none":
        step_fn = jax.checkpoint(step_fn, policy=REMAT_POLICIES[remat])
    frozen_params = jax.lax.stop_gradient(params)

    def body(x: jax.Array, inputs: tuple[jax.Array, jax.Array]):
        return step_fn(params, x, inputs)

    def frozen_body(x: jax.Array, inputs: tuple[jax.Array, jax.Array]):
        return step_fn(frozen_params, x, inputs)

    # "last": the steps before the cut carry no gradient at all (module docstring).
    frozen_before = 0
    if not traced_cuts and grad_cut == "last" and static_cuts.any():
        frozen_before = int(np.flatnonzero(static_cuts)[0])

    noise_time_major = jnp.swapaxes(noise, 0, 1)  # [T, B, ...]
    indices = jnp.arange(num_steps, dtype=jnp.int32)
    if python_loop:
        x, outputs = x_T, []
        for i in range(num_steps):
            if not traced_cuts and static_cuts[i]:
                x = jax.lax.stop_gradient(x)
            x, out = (frozen_body if i < frozen_before else body)(
                x, (indices[i], noise_time_major[i]))
            outputs.append(out)
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *outputs)
    elif traced_cuts:
        x, stacked = jax.lax.scan(body, x_T, (indices, noise_time_major), unroll=unroll)
    else:
        x, stacked = _segmented_scan(body, frozen_body, frozen_before, x_T, indices,
                                     noise_time_major, segments(static_cuts), unroll)
    states, next_states, log_probs, hook_outputs = stacked
    trajectory = Trajectory(
        x_t=jnp.swapaxes(states, 0, 1),
        x_prev=jnp.swapaxes(next_states, 0, 1),
        timesteps=jnp.broadcast_to(schedule.timesteps[None, :], (batch, num_steps)),
        noise=noise,
        log_prob=jnp.swapaxes(log_probs, 0, 1),
        x0=x,
    )
    return trajectory, hook_outputs


def _segmented_scan(body: Callable, frozen_body: Callable, frozen_before: int, x: jax.Array,
                    indices: jax.Array, noise: jax.Array,
                    groups: list[tuple[int, int, int, bool]], unroll: int | bool):
    """``lax.scan(body, x, (indices, noise))`` with the state cut at the runs of ``groups``;
    runs that end by step ``frozen_before`` use ``frozen_body`` (parameters cut)."""

    def run(step_body: Callable, x: jax.Array, xs: tuple[jax.Array, jax.Array], cut: bool):
        if cut:
            x = jax.lax.stop_gradient(x)
        if xs[0].shape[0] == 1:  # a one-step run: no inner loop
            x, out = step_body(x, jax.tree_util.tree_map(lambda a: a[0], xs))
            return x, jax.tree_util.tree_map(lambda a: a[None], out)
        return jax.lax.scan(step_body, x, xs, unroll=unroll)

    pieces = []
    for start, length, repeats, cut in groups:
        stop = start + length * repeats
        step = frozen_body if stop <= frozen_before else body
        xs = (indices[start:stop], noise[start:stop])
        if repeats == 1:
            x, out = run(step, x, xs, cut)
        else:  # one scan over the repeated runs, [repeats, length, ...] inputs
            xs = jax.tree_util.tree_map(
                lambda a: a.reshape((repeats, length) + a.shape[1:]), xs)
            x, out = jax.lax.scan(lambda c, r: run(step, c, r, cut), x, xs, unroll=unroll)
            out = jax.tree_util.tree_map(lambda a: a.reshape((repeats * length,) + a.shape[2:]),
                                         out)
        pieces.append(out)
    if len(pieces) == 1:
        return x, pieces[0]
    return x, jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *pieces)


def reference_eps_distance(eps_fn: ddim.EpsFn, reference_params: Any, info: StepInfo,
                           context: jax.Array, null_context: jax.Array,
                           guidance_scale: float, kl_on: str) -> jax.Array:
    """D_i = mean over batch and dims of (eps_policy - eps_reference)^2 at the step's state.

    Noise predictions: for a v- (or x0-) prediction model the outputs' difference is scaled by
    ``info.distance_scale``, so D means the same for every parametrisation; for a flow model D
    is the distance of the velocities.

    ``kl_on="conditional"`` compares the conditional predictions eps(x_t, t, c), VARD's
    definition (one reference call on B samples); ``"guided"`` the classifier-free-guided ones
    the sampler uses (2B reference calls with guidance w != 1; a change of the conditional
    branch then weighs ~w^2 more). The reference model is called here, at ``info.x_t``.
    """
    timesteps = step_timesteps(info.timestep, info.x_t.shape[0])
    if kl_on == "conditional":
        eps_ref = eps_fn(reference_params, info.x_t, timesteps, context)
        return info.distance_scale ** 2 * jnp.mean((info.eps_cond - eps_ref) ** 2)
    if kl_on == "guided":
        eps_ref = ddim.guided_eps(eps_fn, reference_params, info.x_t, timesteps, context,
                                  null_context, guidance_scale)
        return info.distance_scale ** 2 * jnp.mean((info.output - eps_ref) ** 2)
    raise ValueError(f"kl_on {kl_on!r}: use 'conditional' or 'guided'")


def resolve_unroll(unroll: int) -> int | bool:
    """The ``lax.scan`` unroll of a *differentiated* rollout; 0 means automatic.

    XLA's CPU backend runs the backward pass of a while loop whose body holds the UNet's
    convolutions some 20x slower than the same steps unrolled (measured: 39 s vs. 1.6 s for
    two steps of the shapes UNet at batch 16), so on CPU the scan is fully unrolled; on GPU
    and TPU it stays a loop (short compiles, the same speed).
    """
    if unroll:
        return unroll
    return True if jax.default_backend() == "cpu" else 1


def sample_noise(key: jax.Array, batch: int, num_steps: int, shape: tuple[int, ...],
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """(x_T [B, ...], z [B, T, ...]) standard normal draws for one rollout."""
    key_init, key_steps = jax.random.split(key)
    x_T = jax.random.normal(key_init, (batch,) + tuple(shape), dtype)
    z = jax.random.normal(key_steps, (batch, num_steps) + tuple(shape), dtype)
    return x_T, z
