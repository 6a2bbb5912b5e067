"""DDIM step against diffusers, and the rollout scan: loop equivalence, gradients, log-probs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import NoiseScheduleConfig, add_noise, make_ddim_schedule

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "data"
DDIM = json.loads((REFERENCE / "ddim.json").read_text())
DDIM_ARRAYS = np.load(REFERENCE / "ddim.npz")


@pytest.mark.parametrize("name", list(DDIM["settings"]))
@pytest.mark.parametrize("eta", DDIM["etas"])
@pytest.mark.parametrize("num_steps", DDIM["steps"])
def test_ddim_step_matches_diffusers(name, eta, num_steps):
    """Timesteps, step means and noise scales equal diffusers' DDIMScheduler (PyTorch, recorded
    by tests/reference/make_reference.py): its defaults, SD 1.x and SD 2.x (v-prediction)."""
    ours = make_ddim_schedule(NoiseScheduleConfig.from_diffusers(DDIM["settings"][name]),
                              num_steps)
    np.testing.assert_array_equal(np.asarray(ours.timesteps),
                                  DDIM_ARRAYS[f"{name}/{num_steps}/timesteps"])
    key = f"{name}/{num_steps}/{eta}"
    for row, i in enumerate(DDIM_ARRAYS[f"{key}/indices"]):
        x = jnp.asarray(DDIM_ARRAYS[f"{key}/x"][row])
        out = jnp.asarray(DDIM_ARRAYS[f"{key}/model_output"][row])
        step = ddim.ddim_step(ours, int(i), x, out, None, eta)
        np.testing.assert_allclose(step.mean, DDIM_ARRAYS[f"{key}/mean"][row], atol=1e-5,
                                   rtol=1e-5)
        np.testing.assert_allclose(step.x_prev, step.mean)
        np.testing.assert_allclose(step.std, DDIM_ARRAYS[f"{key}/std"][row], atol=1e-5,
                                   rtol=1e-5)


def test_clip_straight_through_values_and_derivative():
    x = jnp.array([-3.0, -1.0, 0.25, 0.9, 2.0])
    np.testing.assert_array_equal(ddim.clip_straight_through(x, 1.0), jnp.clip(x, -1.0, 1.0))
    weights = jnp.arange(1.0, 6.0)
    for derivative in (jax.grad, lambda f: jax.jit(jax.grad(f)), jax.jacfwd):
        np.testing.assert_array_equal(
            derivative(lambda v: jnp.sum(weights * ddim.clip_straight_through(v, 1.0)))(x),
            weights)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_straight_through_clip_keeps_the_step_and_takes_the_unclipped_derivative(eta):
    # The first step of a pixel-space schedule: x0_hat ~ x / sqrt(a), a ~ 1e-4, mostly outside
    # [-1, 1], so the exact clip's derivative with respect to the model output is zero there.
    base = make_ddim_schedule(NoiseScheduleConfig(clip_sample=True), 10)
    straight = base.replace(clip_gradient="straight_through")
    unclipped = base.replace(clip_sample=False)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 4)), jnp.float32)
    out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    z = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    for i in (0, 9):
        exact_step = ddim.ddim_step(base, i, x, out, z, eta)
        straight_step = ddim.ddim_step(straight, i, x, out, z, eta)
        for a, b in zip(exact_step, straight_step):
            np.testing.assert_array_equal(a, b)

        def objective(schedule, model_output):
            return jnp.sum(weights * ddim.ddim_step(schedule, i, x, model_output, z, eta).x_prev)

        grad_exact, grad_straight, grad_unclipped = (
            jax.grad(objective, argnums=1)(s, out) for s in (base, straight, unclipped))
        np.testing.assert_allclose(grad_straight, grad_unclipped, rtol=1e-5, atol=1e-6)
        x0 = ddim.predict_x0_eps(unclipped, base.alpha_t[i], x, out)[0]
        outside = np.abs(np.asarray(x0)) > 1.0
        if i == 0:
            assert outside.mean() > 0.9
        # Where the clip is inactive all three agree; where it is active they differ.
        np.testing.assert_allclose(np.asarray(grad_exact)[~outside],
                                   np.asarray(grad_straight)[~outside], rtol=1e-5, atol=1e-6)
        if outside.any():
            assert not np.allclose(np.asarray(grad_exact)[outside],
                                   np.asarray(grad_straight)[outside])
    with pytest.raises(ValueError, match="clip_gradient 'identity' is not supported"):
        ddim.ddim_step(base.replace(clip_gradient="identity"), 0, x, out, z, eta)


@pytest.mark.parametrize("name", list(DDIM["settings"]))
def test_add_noise_matches_diffusers(name):
    schedule = make_ddim_schedule(NoiseScheduleConfig.from_diffusers(DDIM["settings"][name]), 10)
    x0, noise = DDIM_ARRAYS[f"{name}/add_noise_inputs"]
    t = jnp.array([0, 500, 999])
    np.testing.assert_allclose(add_noise(schedule.alphas_cumprod, x0, noise, t),
                               DDIM_ARRAYS[f"{name}/add_noise"], atol=1e-6)


def test_step_with_noise_and_log_prob_is_gaussian():
    schedule = make_ddim_schedule(NoiseScheduleConfig(), 10)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4, 2, 3, 3))
    eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    z = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    step = ddim.ddim_step(schedule, 3, x, eps, z, 1.0)
    np.testing.assert_allclose(step.x_prev, step.mean + step.std * z, rtol=1e-6)
    log_prob = ddim.gaussian_log_prob(step.x_prev, step.mean, step.std)
    diff = np.asarray(step.x_prev - step.mean, np.float64).reshape(4, -1)
    s = float(step.std)
    expected = (-0.5 * (diff / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5)
    # eta = 0: deterministic, no density: reported as 0.
    step0 = ddim.ddim_step(schedule, 3, x, eps, z, 0.0)
    assert float(step0.std) == 0.0
    np.testing.assert_array_equal(ddim.gaussian_log_prob(step0.x_prev, step0.mean, step0.std), 0.0)


# --- the rollout scan on a tiny differentiable noise model -----------------------------------

SHAPE = (2, 4, 4)  # [C, H, W]
T = 6


def tiny_eps(params, x, timesteps, context):
    """A smooth toy noise model: per-channel affine map of x with time and text terms."""
    time = (timesteps.astype(jnp.float32) / 1000.0)[:, None, None, None]
    text = jnp.mean(context, axis=(1, 2))[:, None, None, None]
    hidden = x * params["scale"][None, :, None, None] + params["time"] * time + params["text"] * text
    return jnp.tanh(hidden) + params["bias"][None, :, None, None]


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "scale": jnp.asarray(rng.uniform(0.5, 1.0, size=(2,)), jnp.float32),
        "time": jnp.asarray(0.3, jnp.float32),
        "text": jnp.asarray(0.2, jnp.float32),
        "bias": jnp.asarray(rng.normal(scale=0.1, size=(2,)), jnp.float32),
    }


@pytest.fixture(scope="module")
def setup():
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    x_T, z = rollout_lib.sample_noise(jax.random.PRNGKey(3), 3, T, SHAPE)
    context = jax.random.normal(jax.random.PRNGKey(4), (3, 5, 8))
    null = jnp.zeros((1, 5, 8))
    return schedule, x_T, z, context, null


def _float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        tree)


@pytest.fixture
def setup64(setup):
    """``setup`` in float64, inside ``jax.enable_x64``, for the tests that compare two ways of
    computing one gradient (segmented vs one scan, traced vs static cuts, loop vs scan).

    In float32 they differ by rounding that depends on the CPU and the compiler's fusion: the
    early DDIM steps divide by sqrt(alpha_bar) ~ 0.07, and the chain's gradients agree to only
    ~1e-4 relative. In float64 the same differences are ~1e-12, so a 1e-9 tolerance holds on
    any machine and still catches a wrong cut.
    """
    with jax.enable_x64(True):
        yield _float64(setup)


def run(setup, params, **kwargs):
    schedule, x_T, z, context, null = setup
    kwargs.setdefault("eta", 1.0)
    kwargs.setdefault("guidance_scale", 2.0)
    return rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null, **kwargs)


def test_scan_equals_python_loop(setup):
    params = tiny_params()
    hook = lambda info: jnp.mean(info.x_prev**2)  # noqa: E731
    scanned, hook_scan = run(setup, params, step_hook=hook)
    looped, hook_loop = run(setup, params, step_hook=hook, python_loop=True)
    for a, b in zip(scanned, looped):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hook_scan, hook_loop, rtol=1e-5)
    assert scanned.x_t.shape == (3, T) + SHAPE and scanned.log_prob.shape == (3, T)
    np.testing.assert_array_equal(scanned.x_t[:, 1:], scanned.x_prev[:, :-1])
    np.testing.assert_array_equal(scanned.x0, scanned.x_prev[:, -1])


def test_rollout_reproducible_and_manual(setup):
    params = tiny_params()
    first, _ = run(setup, params)
    second, _ = run(setup, params)
    np.testing.assert_array_equal(first.x0, second.x0)
    # Step-by-step with the DDIM step and the explicit guidance formula.
    schedule, x_T, z, context, null = setup
    x = x_T
    for i in range(T):
        t = jnp.full((3,), schedule.timesteps[i])
        e_c = tiny_eps(params, x, t, context)
        e_u = tiny_eps(params, x, t, jnp.broadcast_to(null, context.shape))
        x = ddim.ddim_step(schedule, i, x, e_u + 2.0 * (e_c - e_u), z[:, i], 1.0).x_prev
        log_prob = first.log_prob[:, i]
        assert np.all(np.isfinite(log_prob))
    np.testing.assert_allclose(first.x0, x, rtol=1e-5, atol=1e-6)


def test_log_probs_match_direct_gaussian(setup):
    params = tiny_params()
    traj, _ = run(setup, params)
    schedule = setup[0]
    for i in range(T):
        out = ddim.ddim_step(schedule, i, traj.x_t[:, i],
                             ddim.guided_eps(tiny_eps, params, traj.x_t[:, i],
                                             traj.timesteps[:, i], setup[3], setup[4], 2.0),
                             None, 1.0)
        std = float(out.std)
        if std == 0.0:  # the last step lands on alpha_bar = 1: deterministic
            assert i == T - 1
            np.testing.assert_array_equal(traj.log_prob[:, i], 0.0)
            continue
        d = np.asarray(traj.x_prev[:, i] - out.mean, np.float64).reshape(3, -1)
        expected = (-0.5 * (d / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
        np.testing.assert_allclose(traj.log_prob[:, i], expected, rtol=2e-4, atol=2e-3)


def _final_loss(setup, params, **kwargs):
    traj, _ = run(setup, params, **kwargs)
    return jnp.mean(jnp.sin(traj.x0) + traj.x0**2)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_gradient_through_scan_matches_finite_differences(setup, remat):
    params = tiny_params()
    grads = jax.grad(lambda p: _final_loss(setup, p, remat=remat))(params)
    h = 1e-2
    for name in params:
        flat = np.asarray(params[name], np.float64).reshape(-1)
        for j in range(flat.size):
            def shifted(delta):
                value = flat.copy()
                value[j] += delta
                p = dict(params, **{name: jnp.asarray(value.reshape(np.shape(params[name])),
                                                     jnp.float32)})
                return float(_final_loss(setup, p, remat=remat))
            numeric = (shifted(h) - shifted(-h)) / (2 * h)
            analytic = float(np.asarray(grads[name]).reshape(-1)[j])
            assert abs(numeric - analytic) <= 2e-3 + 2e-2 * abs(numeric), (name, j, numeric, analytic)


def test_remat_does_not_change_gradients(setup):
    params = tiny_params()
    g_plain = jax.grad(lambda p: _final_loss(setup, p, remat="none"))(params)
    g_remat = jax.grad(lambda p: _final_loss(setup, p, remat="dots"))(params)
    for name in params:
        np.testing.assert_allclose(g_plain[name], g_remat[name], rtol=1e-5, atol=1e-7)


def per_step_loss(x_prev):
    return jnp.mean(jnp.cos(x_prev) * x_prev)


def test_k1_gradient_is_sum_of_local_gradients(setup):
    params = tiny_params(1)
    schedule, x_T, z, context, null = setup

    def hooked_loss(p):
        _, losses = run(setup, p, grad_depth=1, step_hook=lambda info: per_step_loss(info.x_prev))
        return jnp.sum(losses)

    grads = jax.grad(hooked_loss)(params)
    traj, _ = run(setup, params)  # same forward values
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(T):
        def local(p, i=i):
            x = traj.x_t[:, i]
            eps = ddim.guided_eps(tiny_eps, p, x, traj.timesteps[:, i], context, null, 2.0)
            return per_step_loss(ddim.ddim_step(schedule, i, x, eps, z[:, i], 1.0).x_prev)
        total = jax.tree_util.tree_map(jnp.add, total, jax.grad(local)(params))
    for name in params:
        np.testing.assert_allclose(grads[name], total[name], rtol=1e-4, atol=1e-6)
    # Full depth differs: the chain contributes.
    full = jax.grad(lambda p: jnp.sum(run(setup, p, step_hook=lambda info: per_step_loss(
        info.x_prev))[1]))(params)
    assert not np.allclose(full["scale"], grads["scale"], rtol=1e-3)


def test_gradient_cuts():
    np.testing.assert_array_equal(rollout_lib.gradient_cuts(5, 1), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rollout_lib.gradient_cuts(5, 2), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(rollout_lib.gradient_cuts(5, 5), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rollout_lib.gradient_cuts(5, 2, "last"), [0, 0, 0, 1, 0])
    with pytest.raises(ValueError):
        rollout_lib.gradient_cuts(5, 0)


def test_last_k_gradient_equals_prefix_free_rollout(setup64):
    """With grad_cut='last' and K steps, the gradient equals that of a rollout over the last K
    steps started from the (fixed) state the full chain reached there."""
    setup = setup64
    params = _float64(tiny_params(2))
    k = 2
    g = jax.grad(lambda p: _final_loss(setup, p, grad_depth=k, grad_cut="last"))(params)
    schedule, x_T, z, context, null = setup
    traj, _ = run(setup, params)
    x_start = traj.x_t[:, T - k]

    def tail_loss(p):
        x = x_start
        for i in range(T - k, T):
            eps = ddim.guided_eps(tiny_eps, p, x, traj.timesteps[:, i], context, null, 2.0)
            x = ddim.ddim_step(schedule, i, x, eps, z[:, i], 1.0).x_prev
        return jnp.mean(jnp.sin(x) + x**2)

    expected = jax.grad(tail_loss)(params)
    for name in params:
        np.testing.assert_allclose(g[name], expected[name], rtol=1e-9, atol=1e-12)


def test_explicit_cuts_array_matches_depth_option(setup64):
    setup = setup64
    params = _float64(tiny_params(3))
    by_depth = jax.grad(lambda p: _final_loss(setup, p, grad_depth=2, grad_cut="last"))(params)
    cuts = jnp.asarray(rollout_lib.gradient_cuts(T, 2, "last"))
    by_array = jax.jit(jax.grad(lambda p, c: _final_loss(setup, p, cuts=c)))(params, cuts)
    for name in params:  # a segmented scan vs one scan (float64: see setup64)
        np.testing.assert_allclose(by_depth[name], by_array[name], rtol=1e-9, atol=1e-12)


def test_segments_split_the_chain_at_static_cuts():
    assert rollout_lib.segments(rollout_lib.gradient_cuts(50, 1)) == [(0, 1, 50, True)]
    assert rollout_lib.segments(rollout_lib.gradient_cuts(10, 3, "last")) == [
        (0, 7, 1, False), (7, 3, 1, True)]
    assert rollout_lib.segments(rollout_lib.gradient_cuts(10, 3)) == [
        (0, 3, 3, True), (9, 1, 1, True)]
    assert rollout_lib.segments(rollout_lib.gradient_cuts(6, None)) == [(0, 6, 1, False)]
    for cuts in (rollout_lib.gradient_cuts(7, 2), [0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]):
        groups = rollout_lib.segments(np.asarray(cuts, bool))
        starts = [s + r * n for s, n, reps, _ in groups for r in range(reps)]
        assert sum(n * reps for _, n, reps, _ in groups) == 7
        assert sorted(set(np.flatnonzero(cuts)) | {0}) == starts  # a run begins at each cut


@pytest.mark.parametrize("depth,mode", [(1, "window"), (2, "window"), (4, "window"),
                                        (3, "last"), (1, "last")])
def test_static_cuts_match_traced_cuts(setup64, depth, mode):
    """The segmented scan (static cuts) gives the trajectory, hook outputs and gradients of
    the single scan with a traced cuts array, and of the Python loop."""
    setup = setup64
    params = _float64(tiny_params(4))
    cuts = jnp.asarray(rollout_lib.gradient_cuts(T, depth, mode))

    def loss(p, **kwargs):
        traj, per_step = run(setup, p, step_hook=lambda info: per_step_loss(info.x_prev),
                             **kwargs)
        if mode == "last":  # steps before the cut carry no gradient there: final loss only
            per_step = per_step[T - depth:]
        return jnp.sum(per_step) + jnp.mean(jnp.sin(traj.x0)), traj

    (value, traj), grads = jax.value_and_grad(
        lambda p: loss(p, grad_depth=depth, grad_cut=mode), has_aux=True)(params)
    for kwargs in (dict(cuts=cuts), dict(grad_depth=depth, grad_cut=mode, python_loop=True)):
        (value_other, traj_other), grads_other = jax.value_and_grad(
            lambda p: loss(p, **kwargs), has_aux=True)(params)
        # One scan, nested scans and unrolled steps round differently (float64: see setup64).
        np.testing.assert_allclose(value, value_other, rtol=1e-9, atol=1e-12)
        for a, b in zip(traj, traj_other):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        for name in params:
            np.testing.assert_allclose(grads[name], grads_other[name], rtol=1e-9, atol=1e-12)


def _gradient_flops(setup, loss_of_rollout, unroll, **kwargs):
    def loss(p):
        return loss_of_rollout(*run(setup, p, unroll=unroll, **kwargs))
    analysis = jax.jit(jax.grad(loss)).lower(tiny_params(5)).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"]


def test_static_cuts_skip_backward_work(setup):
    """With K = 1 in a loop the static cut removes the backward pass's input gradient of every
    model call (the traced cut computes it, then zeroes it); with the "last" cut the backward
    pass skips the steps before it. XLA's cost analysis counts a loop body once, so the first
    comparison is per step (both loops) and the second is unrolled."""
    def per_step(_, outputs):
        return jnp.sum(outputs)

    hook = dict(step_hook=lambda info: per_step_loss(info.x_prev))
    static = _gradient_flops(setup, per_step, 1, grad_depth=1, **hook)
    traced = _gradient_flops(setup, per_step, 1,
                             cuts=jnp.asarray(rollout_lib.gradient_cuts(T, 1)), **hook)
    assert static < 0.95 * traced, (static, traced)

    def final(traj, _):
        return jnp.mean(traj.x0 ** 2)

    last_one = _gradient_flops(setup, final, True, grad_depth=1, grad_cut="last")
    full = _gradient_flops(setup, final, True)
    assert last_one < 0.5 * full, (last_one, full)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kl_on", ["conditional", "guided"])
def test_reference_distance_is_on_noise_predictions_for_every_parametrisation(
        setup, prediction_type, kl_on):
    """D_i compares noise predictions: a v- or x0-prediction model's outputs are converted
    first, so the KL weight beta means the same for SD 2.x's v-prediction models."""
    schedule = make_ddim_schedule(NoiseScheduleConfig(prediction_type=prediction_type), T)
    _, x_T, z, context, null = setup
    policy, reference = tiny_params(0), tiny_params(1)

    def hook(info):
        distance = rollout_lib.reference_eps_distance(tiny_eps, reference, info, context, null,
                                                      2.0, kl_on)
        timesteps = jnp.full((x_T.shape[0],), info.timestep, jnp.int32)
        a_t = schedule.alpha_t[info.index]
        if kl_on == "conditional":
            outputs = [tiny_eps(p, info.x_t, timesteps, context) for p in (policy, reference)]
        else:
            outputs = [ddim.guided_eps(tiny_eps, p, info.x_t, timesteps, context, null, 2.0)
                       for p in (policy, reference)]
        eps_policy, eps_reference = (ddim.predict_x0_eps(schedule, a_t, info.x_t, out)[1]
                                     for out in outputs)
        return distance, jnp.mean((eps_policy - eps_reference) ** 2)

    _, (distance, expected) = rollout_lib.rollout(tiny_eps, policy, schedule, x_T, z, context,
                                                  null, eta=1.0, guidance_scale=2.0,
                                                  step_hook=hook)
    np.testing.assert_allclose(distance, expected, rtol=1e-4)
    assert float(jnp.min(expected)) > 0
