"""Flow-matching sampling (vard_jax/diffusion/flow.py): the sigma grid and the Euler step against
diffusers' FlowMatchEulerDiscreteScheduler (recorded in tests/reference/data/flow.*), the SDE
step's kernel and marginals, and the one rollout scan driven by a flow schedule."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vard_jax.diffusion import ddim, flow, rollout as rollout_lib, schedule as schedule_lib

DATA = pathlib.Path(__file__).resolve().parent / "reference" / "data"
RECORD = json.loads((DATA / "flow.json").read_text())
ARRAYS = dict(np.load(DATA / "flow.npz"))
CASES = [(name, steps) for name in RECORD["settings"] for steps in RECORD["steps"]]


def _config(name: str) -> flow.FlowMatchConfig:
    return flow.FlowMatchConfig.from_diffusers(RECORD["settings"][name])


@pytest.mark.parametrize("name,steps", CASES)
def test_grid_matches_diffusers(name, steps):
    config = _config(name)
    seq_len = RECORD["seq_len"] if config.use_dynamic_shifting else None
    if seq_len is not None:
        np.testing.assert_allclose(config.mu(seq_len), ARRAYS[f"{name}/mu"], rtol=1e-6)
    grid = flow.sigma_grid(config, steps, seq_len)
    np.testing.assert_allclose(grid, ARRAYS[f"{name}/{steps}/sigmas"], rtol=0, atol=1e-6)
    schedule = schedule_lib.make_schedule(config, steps, seq_len)
    assert schedule.timesteps.dtype == jnp.float32 and schedule.num_steps == steps
    np.testing.assert_allclose(schedule.timesteps, ARRAYS[f"{name}/{steps}/timesteps"],
                               rtol=1e-6, atol=1e-3)
    assert float(schedule.prev_timesteps[-1]) == 0.0  # lands on sigma = 0: clean


@pytest.mark.parametrize("name,steps", CASES)
def test_euler_step_matches_diffusers(name, steps):
    config = _config(name)
    schedule = schedule_lib.make_schedule(
        config, steps, RECORD["seq_len"] if config.use_dynamic_shifting else None)
    key = f"{name}/{steps}"
    x, out, want = (ARRAYS[f"{key}/{k}"] for k in ("x", "model_output", "prev_sample"))
    for i in range(steps):
        step = schedule.step(i, jnp.asarray(x[i]), jnp.asarray(out[i]), None, 0.0)
        np.testing.assert_allclose(step.x_prev, want[i], rtol=0, atol=1e-5)
        assert float(step.std) == 0.0  # noise level 0: the ODE, no density
        sigma = float(schedule.sigmas[i])
        np.testing.assert_allclose(step.x0_hat, x[i] - sigma * out[i], atol=1e-6)
        np.testing.assert_allclose(step.eps, x[i] + (1 - sigma) * out[i], atol=1e-6)


def test_sde_step_kernel():
    """x_next = mean + s sqrt(-dt) z with Flow-GRPO's mean; the rollout's log-density is that
    Gaussian's; the noise scale at sigma = 1 uses the grid's second sigma."""
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(shift=3.0), 6)
    rng = np.random.default_rng(0)
    x, v, z = (jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32) for _ in range(3))
    a = 0.7
    for i in range(6):
        sigma, nxt = float(schedule.sigmas[i]), float(schedule.sigma_prev[i])
        capped = float(schedule.sigmas[1]) if sigma == 1.0 else sigma
        s = a * np.sqrt(sigma / (1 - capped))
        dt = nxt - sigma
        mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        step = schedule.step(i, x, v, z, a)
        np.testing.assert_allclose(step.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(step.std), s * np.sqrt(-dt), rtol=1e-5)
        np.testing.assert_allclose(step.x_prev, mean + s * np.sqrt(-dt) * z, rtol=1e-5,
                                   atol=1e-6)
        assert np.isfinite(np.asarray(step.x_prev)).all()
    np.testing.assert_allclose(schedule.std(jnp.arange(6), a),
                               [float(schedule.step(i, x, v, z, a).std) for i in range(6)],
                               rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sde_keeps_the_marginals_of_the_flow(eta):
    """Data x_0 ~ N(0, s0^2): the exact velocity is known in closed form; both the ODE (eta 0)
    and the SDE (eta 0.7) carry N(0, 1) at sigma = 1 to the data distribution and pass
    through the flow's marginal N(0, (1 - sigma)^2 s0^2 + sigma^2) on the way."""
    s0, steps, n = 0.5, 200, 20000
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(), steps)

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s0**2 + sigma**2
        return (sigma - (1 - sigma) * s0**2) / var * x

    key_init, key_steps = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_init, (n, 1))
    zs = jax.random.normal(key_steps, (steps, n, 1))

    def body(x, inputs):
        i, z = inputs
        out = schedule.step(i, x, velocity(x, schedule.sigmas[i]), z, eta)
        return out.x_prev, jnp.var(out.x_prev)

    x, variances = jax.lax.scan(body, x, (jnp.arange(steps), zs))
    sigma = np.asarray(schedule.sigma_prev)
    expected = (1 - sigma) ** 2 * s0**2 + sigma**2
    np.testing.assert_allclose(np.asarray(variances)[steps // 2], expected[steps // 2], rtol=0.05)
    np.testing.assert_allclose(float(jnp.var(x)), s0**2, rtol=0.05)


def test_rollout_with_a_flow_schedule():
    """The one scan runs the flow step: with noise level 0 it is the Euler loop; its
    log-probs are the SDE kernel's; scan and Python loop agree; hooks see float timesteps."""
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(shift=3.0), 4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)), jnp.float32) * 0.3

    def model(params, x, timesteps, context):
        assert timesteps.dtype == jnp.float32
        return jnp.einsum("ij,bjhw->bihw", params, x) * (timesteps / 1000.0)[:, None, None,
                                                                              None] + context.mean()

    rng = np.random.default_rng(2)
    x_T = jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 4, 3, 4, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    null = jnp.zeros((1, 5, 8))
    trajectory, timesteps = rollout_lib.rollout(model, w, schedule, x_T, noise, context, null,
                                                eta=0.0, guidance_scale=2.0,
                                                step_hook=lambda info: info.timestep)
    x = x_T
    for i in range(4):
        t = jnp.full((2,), schedule.timesteps[i])
        guided = ddim.guided_eps(model, w, x, t, context, null, 2.0)
        x = x + (schedule.sigma_prev[i] - schedule.sigmas[i]) * guided
    np.testing.assert_allclose(trajectory.x0, x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(timesteps, schedule.timesteps)
    assert trajectory.timesteps.dtype == jnp.float32

    sde, _ = rollout_lib.rollout(model, w, schedule, x_T, noise, context, null, eta=0.7,
                                 guidance_scale=2.0)
    loop, _ = rollout_lib.rollout(model, w, schedule, x_T, noise, context, null, eta=0.7,
                                  guidance_scale=2.0, python_loop=True)
    np.testing.assert_allclose(sde.x0, loop.x0, rtol=1e-5, atol=1e-6)
    for i in range(4):
        t = jnp.full((2,), schedule.timesteps[i])
        guided = ddim.guided_eps(model, w, sde.x_t[:, i], t, context, null, 2.0)
        step = schedule.step(i, sde.x_t[:, i], guided, None, 0.7)
        np.testing.assert_allclose(sde.log_prob[:, i], ddim.gaussian_log_prob(
            sde.x_prev[:, i], step.mean, step.std), rtol=1e-5)


def test_one_step_grid_has_a_finite_noise_scale():
    """T = 1: the grid's second sigma is 0, so the noise scale at sigma = 1 is eta itself."""
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(), 1)
    np.testing.assert_allclose(schedule.noise_scale(0, 0.7), 0.7, rtol=1e-6)
    np.testing.assert_allclose(schedule.std(0, 0.7), 0.7, rtol=1e-6)


def test_flow_interface_pieces():
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(shift=3.0), 5)
    x = jnp.ones((2, 3, 2, 2))
    v = jnp.full((2, 3, 2, 2), 0.5)
    t = jnp.asarray([schedule.timesteps[1], 0.0])
    x0 = schedule.x0_at(t, x, v)
    np.testing.assert_allclose(x0[0], 1 - float(schedule.sigmas[1]) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(x0[1], x[1])  # sigma 0: already clean
    assert float(schedule.distance_scale(2)) == 1.0  # KL on velocities
    assert float(schedule.noise_level(2)) == pytest.approx(float(schedule.sigmas[2]))
    # An eps shift moves eps by itself and x0_hat by -sigma / (1 - sigma) times it.
    shift = jnp.full_like(x, 0.1)
    plain, shifted = schedule.step(2, x, v, None, 0.0), schedule.step(2, x, v, None, 0.0, shift)
    np.testing.assert_allclose(shifted.eps - plain.eps, shift, rtol=1e-5)
    sigma = float(schedule.sigmas[2])
    np.testing.assert_allclose(shifted.x0_hat - plain.x0_hat, -sigma / (1 - sigma) * shift,
                               rtol=1e-4)
    assert schedule_lib.with_clip_gradient(schedule, "straight_through") is schedule


def test_bad_flow_configs_stop_with_one_line():
    with pytest.raises(flow.FlowConfigError, match="use_karras_sigmas = True is not supported"):
        flow.FlowMatchConfig.from_diffusers({"shift": 3.0, "use_karras_sigmas": True},
                                            "sd/scheduler/scheduler_config.json")
    with pytest.raises(flow.FlowConfigError, match="time_shift_type"):
        flow.FlowMatchConfig.from_diffusers({"time_shift_type": "cosine"})
    dynamic = flow.FlowMatchConfig(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.sigma_grid(dynamic, 4)
    with pytest.raises(ValueError, match="num_steps = 0"):
        flow.sigma_grid(flow.FlowMatchConfig(), 0)
    # Unknown fields (diffusers' class name, version) are ignored, as for DDIM configs.
    assert flow.FlowMatchConfig.from_diffusers(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).shift == 3.0
