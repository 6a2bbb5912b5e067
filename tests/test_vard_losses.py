"""VARD's losses on tiny models: value regression, the policy gradient's fixed point, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vard_jax.algorithms import vard
from vard_jax.diffusion import rollout as rollout_lib
from vard_jax.diffusion.schedule import NoiseScheduleConfig, make_ddim_schedule
from vard_jax.models import value as value_lib
from vard_jax.training.state import RewardStats

from tests.test_diffusion import tiny_eps, tiny_params

SHAPE = (2, 4, 4)
T = 5


def test_value_regression_learns_a_synthetic_target():
    model = value_lib.conv_value((3, 8, 8), (4, 6), width=8)
    params = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n = 128
    states = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=n).astype(np.int32)
    context = rng.normal(size=(n, 4, 6)).astype(np.float32)
    # A target that needs the state, the timestep and the text: mean of channel 0, scaled by t.
    targets = (states[:, 0].mean((1, 2)) * 4.0 * (1.0 - timesteps / 1000.0)
               + context.mean((1, 2))).astype(np.float32)
    targets = (targets - targets.mean()) / targets.std()
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        (loss, _), grads = jax.value_and_grad(vard.value_loss, argnums=1, has_aux=True)(
            model.apply, params, states, timesteps, context, targets, {})
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    initial = float(step(params, opt_state)[2])
    for _ in range(60):  # (the loss reaches ~2e-4: far below the bound)
        params, opt_state, loss = step(params, opt_state)
    assert initial > 0.9  # zero-initialised head: starts at the target variance
    assert float(loss) < 0.1, float(loss)


def _inputs(batch=3, fraction=1.0, key=0):
    x_T, noise = rollout_lib.sample_noise(jax.random.PRNGKey(key), batch, T, SHAPE)
    return vard.PolicyInputs(
        context=jax.random.normal(jax.random.PRNGKey(key + 1), (batch, 5, 8)),
        null_context=jnp.zeros((1, 5, 8)), x_T=x_T, noise=noise,
        step_mask=vard.step_mask(jax.random.PRNGKey(key + 2), T, fraction), value_aux={})


def _config(beta=0.5, depth=1):
    return vard.PolicyLossConfig(beta=beta, grad_depth=depth, eta=1.0, guidance_scale=2.0,
                                 remat="none")


def constant_value(params, x, t, context, aux):
    return jnp.full((x.shape[0],), 0.7)


def linear_value(params, x, t, context, aux):
    return jnp.mean(x * params, axis=(1, 2, 3))


def _grad(policy, reference, value_apply, value_params=None, beta=0.5, depth=1, inputs=None):
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    inputs = inputs or _inputs()
    return jax.grad(lambda p: vard.policy_loss(tiny_eps, p, reference, value_apply, value_params,
                                               schedule, inputs, _config(beta, depth))[0])(policy)


def test_policy_gradient_is_zero_at_the_reference_with_constant_value():
    params = tiny_params()
    grads = _grad(params, params, constant_value)
    for leaf in jax.tree_util.tree_leaves(grads):
        np.testing.assert_allclose(leaf, 0.0, atol=1e-7)
    # Away from the reference the KL term pulls back: non-zero gradient.
    moved = dict(params, bias=params["bias"] + 0.1)
    grads = _grad(moved, params, constant_value)
    assert float(jnp.abs(grads["bias"]).sum()) > 1e-4
    # A value that depends on the state gives a non-zero gradient at the reference too.
    grads = _grad(params, params, linear_value, value_params=jnp.ones(SHAPE))
    assert float(jnp.abs(grads["bias"]).sum()) > 1e-4


def test_kl_gradient_matches_closed_form_direction():
    """With V constant, the gradient of beta * mean D_i moves the bias toward the reference."""
    params = tiny_params()
    moved = dict(params, bias=params["bias"] + jnp.array([0.2, -0.2]))
    grads = _grad(moved, params, constant_value, beta=1.0)
    # L = +beta * mean D; dL/dbias has the sign of (bias - bias_ref) (guidance adds bias once).
    assert float(grads["bias"][0]) > 0 and float(grads["bias"][1]) < 0


def test_policy_loss_masks_untrained_steps():
    params = tiny_params()
    reference = dict(params, bias=params["bias"] - 0.05)
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    full = _inputs()
    loss_full, metrics = vard.policy_loss(tiny_eps, params, reference, linear_value,
                                          jnp.ones(SHAPE), schedule, full, _config())
    half = full._replace(step_mask=jnp.array([1.0, 0.0, 1.0, 0.0, 0.0]))
    loss_half, _ = vard.policy_loss(tiny_eps, params, reference, linear_value, jnp.ones(SHAPE),
                                    schedule, half, _config())
    # Recompute the per-step objectives with a hook to check the masked mean.
    _, per_step = rollout_lib.rollout(
        tiny_eps, params, schedule, full.x_T, full.noise, full.context, full.null_context,
        eta=1.0, guidance_scale=2.0,
        step_hook=lambda info: linear_value(jnp.ones(SHAPE), info.x_prev, None, None, None).mean())
    assert np.isfinite(float(loss_full)) and np.isfinite(float(loss_half))
    assert float(metrics["eps_distance"]) > 0
    np.testing.assert_allclose(float(metrics["final_value"]), float(per_step[-1]), rtol=1e-5)
    assert not np.isclose(float(loss_full), float(loss_half))


def test_step_mask_counts():
    mask = vard.step_mask(jax.random.PRNGKey(0), 10, 0.3)
    assert float(mask.sum()) == 3.0
    assert float(vard.step_mask(jax.random.PRNGKey(0), 10, 1.0).sum()) == 10.0
    assert float(vard.step_mask(jax.random.PRNGKey(0), 10, 0.01).sum()) == 1.0


def test_reward_stats_running_mean_and_variance():
    stats = RewardStats.create()
    first = jnp.array([1.0, 2.0, 3.0])
    stats = stats.update(first, decay=0.5)
    np.testing.assert_allclose(stats.mean, 2.0)
    np.testing.assert_allclose(stats.var, np.var([1, 2, 3]), rtol=1e-6)
    stats = stats.update(jnp.array([5.0, 5.0, 5.0]), decay=0.5)
    np.testing.assert_allclose(stats.mean, 3.5)
    # Variance of the 50/50 mixture of the two batches.
    np.testing.assert_allclose(stats.var, 0.5 * (2 / 3 + 1.5**2) + 0.5 * (0 + 1.5**2), rtol=1e-6)
    np.testing.assert_allclose(stats.standardise(jnp.array(3.5)), 0.0, atol=1e-7)


def test_learning_rate_schedules():
    """Warm-up from peak / warmup, then constant or cosine to 0 at the last update; the
    optimiser applies it (an update at a smaller rate moves the parameters less)."""
    from vard_jax.training.optimizers import learning_rate_schedule, make_optimizer

    constant = learning_rate_schedule(1e-3, 0, 12, "constant")
    np.testing.assert_allclose([float(constant(s)) for s in (0, 11, 50)], [1e-3] * 3,
                               rtol=1e-6)
    cosine = learning_rate_schedule(1e-3, 0, 12, "cosine")
    expected = [1e-3 * 0.5 * (1 + np.cos(np.pi * s / 12)) for s in range(13)]
    np.testing.assert_allclose([float(cosine(s)) for s in range(13)], expected, rtol=1e-5,
                               atol=1e-12)
    warm = learning_rate_schedule(1e-3, 4, 12, "cosine")
    np.testing.assert_allclose([float(warm(s)) for s in range(4)], [2.5e-4, 5e-4, 7.5e-4, 1e-3],
                               rtol=1e-6)
    # After warm-up, the cosine runs over the remaining 8 updates.
    np.testing.assert_allclose(float(warm(4 + 4)), 1e-3 * 0.5, rtol=1e-5)
    assert abs(float(warm(12))) < 1e-12

    optimizer = make_optimizer(learning_rate_schedule(1e-2, 0, 4, "cosine"), 0.0, 0.0)
    params = {"w": jnp.zeros(3)}
    opt_state = optimizer.init(params)
    grads = {"w": jnp.ones(3)}
    moves = []
    for _ in range(4):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        moves.append(float(jnp.abs(updates["w"]).max()))
    # Adam's normalised step is ~1 for a constant gradient: each move is ~ the rate.
    rates = learning_rate_schedule(1e-2, 0, 4, "cosine")
    np.testing.assert_allclose(moves, [float(rates(s)) for s in range(4)], rtol=1e-3)


# --- the options of the policy loss: kl_on, direct_last_step, step subsampling, dtypes --------

def _hooked(params, reference, kl_on, inputs=None, schedule=None):
    """Per step: (D_i from reference_eps_distance, D_i computed by hand at the step's x_t)."""
    schedule = schedule or make_ddim_schedule(NoiseScheduleConfig(), T)
    inputs = inputs or _inputs()
    w = 2.0

    def hand(info):
        t = jnp.full((info.x_t.shape[0],), info.timestep, jnp.int32)
        null = jnp.broadcast_to(inputs.null_context, inputs.context.shape)
        c_p, c_r = tiny_eps(params, info.x_t, t, inputs.context), tiny_eps(
            reference, info.x_t, t, inputs.context)
        u_p, u_r = tiny_eps(params, info.x_t, t, null), tiny_eps(reference, info.x_t, t, null)
        if kl_on == "conditional":
            return jnp.mean((c_p - c_r) ** 2)
        return jnp.mean(((u_p + w * (c_p - u_p)) - (u_r + w * (c_r - u_r))) ** 2)

    def hook(info):
        return (rollout_lib.reference_eps_distance(tiny_eps, reference, info, inputs.context,
                                                   inputs.null_context, w, kl_on), hand(info))

    _, (ours, theirs) = rollout_lib.rollout(
        tiny_eps, params, schedule, inputs.x_T, inputs.noise, inputs.context,
        inputs.null_context, eta=1.0, guidance_scale=w, step_hook=hook)
    return ours, theirs


def test_kl_on_conditional_and_guided_match_the_hand_computation():
    params = tiny_params()
    reference = dict(params, bias=params["bias"] - jnp.array([0.1, 0.05]),
                     text=params["text"] + 0.3)
    results = {}
    for kl_on in ("conditional", "guided"):
        ours, theirs = _hooked(params, reference, kl_on)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
        results[kl_on] = ours
        # The loss's metric is their mean over the (all trained) steps.
        schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
        _, metrics = vard.policy_loss(tiny_eps, params, reference, constant_value, None,
                                      schedule, _inputs(), _config()._replace(kl_on=kl_on))
        np.testing.assert_allclose(float(metrics["eps_distance"]), float(jnp.mean(ours)),
                                   rtol=1e-6)
    # The two differ: the guided one scales the conditional change by w and sees the null one.
    assert not np.allclose(results["conditional"], results["guided"], rtol=1e-2)


def test_conditional_kl_calls_the_reference_on_the_batch_only():
    calls = []

    def counting_eps(params, x, t, context):  # concrete arrays: no jit, a Python loop
        calls.append(("reference" if float(params["mark"]) else "policy", x.shape[0]))
        return tiny_eps(params, x, t, context)

    params = dict(tiny_params(), mark=jnp.float32(0.0))
    reference = dict(tiny_params(1), mark=jnp.float32(1.0))
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    inputs = _inputs(batch=3)
    for kl_on, batch in (("conditional", 3), ("guided", 6)):
        calls.clear()
        vard.policy_loss(counting_eps, params, reference, constant_value, None, schedule, inputs,
                         _config()._replace(kl_on=kl_on, python_loop=True))
        assert [b for tag, b in calls if tag == "reference"] == [batch] * T, kl_on
        assert [b for tag, b in calls if tag == "policy"] == [6] * T  # guided sampling


def test_direct_last_step_scores_the_final_state_once():
    traced = []

    def reward(x0):
        traced.append(x0.shape)
        return jnp.mean(jnp.sin(x0), axis=(1, 2, 3))

    params = tiny_params()
    reference = dict(params, bias=params["bias"] - 0.05)
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    inputs = _inputs()
    config = _config()._replace(python_loop=True)  # every step traced separately
    loss, metrics = vard.policy_loss(tiny_eps, params, reference, linear_value, jnp.ones(SHAPE),
                                     schedule, inputs, config, last_step_reward=reward)
    assert traced == [(3,) + SHAPE]  # once, on x_0
    trajectory, _ = rollout_lib.rollout(tiny_eps, params, schedule, inputs.x_T, inputs.noise,
                                        inputs.context, inputs.null_context, eta=1.0,
                                        guidance_scale=2.0)
    # float32: the Python loop and the scan round differently (~1e-7 absolute here).
    np.testing.assert_allclose(float(metrics["final_value"]),
                               float(jnp.mean(reward(trajectory.x0))), rtol=1e-5, atol=1e-6)
    # The other steps keep V: the loss differs from the all-V loss by the last step only.
    loss_v, metrics_v = vard.policy_loss(tiny_eps, params, reference, linear_value,
                                         jnp.ones(SHAPE), schedule, inputs, config)
    np.testing.assert_allclose(
        float(loss - loss_v),
        -(float(metrics["final_value"]) - float(metrics_v["final_value"])) / T, rtol=1e-4,
        atol=1e-6)


def _counting_model(counts):
    """tiny_eps whose forward and backward passes are counted when they run (debug callbacks
    execute only in the branch of a lax.switch that is taken)."""

    def bump(name):
        def callback():
            counts[name] = counts.get(name, 0) + 1
        return callback

    @jax.custom_vjp
    def model(params, x, t, context):
        jax.debug.callback(bump("forward"))
        return tiny_eps(params, x, t, context)

    def forward(params, x, t, context):
        out, vjp = jax.vjp(lambda p, y, c: tiny_eps(p, y, t, c), params, x, context)
        jax.debug.callback(bump("forward"))
        return out, (vjp, t)

    def backward(residuals, cotangent):
        vjp, t = residuals
        jax.debug.callback(bump("backward"))
        d_params, d_x, d_context = vjp(cotangent)
        return d_params, d_x, np.zeros(t.shape, jax.dtypes.float0), d_context

    model.defvjp(forward, backward)
    return model


def _subsampled_grad(model, params, reference, inputs, depth, subsample, unroll=1):
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    trained = int(jnp.sum(inputs.step_mask)) if subsample else 0
    config = _config(depth=depth)._replace(trained_steps=trained, unroll=unroll)

    @jax.jit
    def grad(p):
        return jax.value_and_grad(lambda q: vard.policy_loss(
            model, q, reference, linear_value, jnp.ones(SHAPE), schedule, inputs, config),
            has_aux=True)(p)

    return jax.block_until_ready(grad(params))


def test_subsampled_steps_run_forward_only_with_the_same_gradient():
    """K = 1: the chain runs forward (no gradient) up to the last trained step; each trained
    step runs again with gradient. Same loss, metrics and gradient as the masked objective
    over every step; the UNet calls are counted when they run."""
    params = tiny_params()
    reference = dict(params, bias=params["bias"] - 0.05)
    for mask, forward_steps, unroll in (
            ([0.0, 1.0, 0.0, 0.0, 1.0], T - 1, 1),  # last trained: step 4
            ([0.0, 1.0, 0.0, 1.0, 0.0], 3, True)):  # step 4 never runs; trained steps unrolled
        inputs = _inputs()._replace(step_mask=jnp.array(mask))
        counts = {}
        (loss, metrics), grads = _subsampled_grad(_counting_model(counts), params, reference,
                                                  inputs, 1, subsample=True, unroll=unroll)
        assert counts["backward"] == 2, (mask, counts)  # the two trained steps only
        # Forward (the loss alone): the chain up to the last trained step, then per trained
        # step the policy again and the reference.
        counts = {}
        config = _config(depth=1)._replace(trained_steps=2, unroll=unroll)
        jax.block_until_ready(jax.jit(lambda q: vard.policy_loss(
            _counting_model(counts), q, reference, linear_value, jnp.ones(SHAPE),
            make_ddim_schedule(NoiseScheduleConfig(), T), inputs, config))(params))
        assert counts == {"forward": forward_steps + 2 * 2}, (mask, counts)
        full_counts = {}
        (loss_all, metrics_all), grads_all = _subsampled_grad(
            _counting_model(full_counts), params, reference, inputs, 1, subsample=False)
        assert full_counts["backward"] == T
        np.testing.assert_allclose(float(loss), float(loss_all), rtol=1e-6)
        for key in ("policy_value_mean", "eps_distance", "final_value"):
            np.testing.assert_allclose(float(metrics[key]), float(metrics_all[key]), rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_all)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # K = 2: the mask selects the objective's terms; every step is differentiated.
    counts = {}
    _subsampled_grad(_counting_model(counts), params, reference, inputs, 2, subsample=True)
    assert counts["backward"] >= T


def test_full_fine_tuning_of_a_bfloat16_reference_starts_at_distance_zero():
    from vard_jax.models import policy as policy_lib

    def eps_in_param_dtype(params, x, t, context):
        # As Flax modules without an explicit dtype: the computation runs in the parameters'.
        dtype = params["scale"].dtype
        out = tiny_eps(params, x.astype(dtype), t, context.astype(dtype))
        return out.astype(jnp.float32)

    reference = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny_params())
    policy = policy_lib.FullPolicy(pipeline=None)
    trainable = policy.init(reference, jax.random.PRNGKey(0))
    assert {a.dtype for a in jax.tree_util.tree_leaves(trainable)} == {jnp.dtype(jnp.float32)}
    for cast, original in zip(jax.tree_util.tree_leaves(policy.unet(trainable, reference)),
                              jax.tree_util.tree_leaves(reference)):
        assert cast.dtype == original.dtype
        np.testing.assert_array_equal(np.asarray(cast, np.float32),
                                      np.asarray(original, np.float32))
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    for kl_on in ("conditional", "guided"):
        def loss(p):
            return vard.policy_loss(eps_in_param_dtype, policy.unet(p, reference), reference,
                                    linear_value, jnp.ones(SHAPE), schedule, _inputs(),
                                    _config()._replace(kl_on=kl_on))
        (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
        # Without the cast to the reference's dtypes D = 1.8e-7 for both options. With it the
        # weights are the reference's exactly (above); what remains is XLA rounding the
        # bfloat16 operations of the two differently fused calls (~2e-16 on CPU, 1.4e-9 seen
        # on an H200).
        assert float(metrics["eps_distance"]) < 1e-8, kl_on
        assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
        assert float(jnp.abs(grads["bias"]).sum()) > 0
