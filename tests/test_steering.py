"""The value at sampling time: value guidance, value-steered SMC, best-of-N, value-only runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_diffusion import SHAPE, T, tiny_eps, tiny_params
from vard_jax.diffusion import rollout as rollout_lib, steering
from vard_jax.diffusion.schedule import NoiseScheduleConfig, make_ddim_schedule

P, N = 3, 4  # prompts, particles per prompt


@pytest.fixture(scope="module")
def toy():
    schedule = make_ddim_schedule(NoiseScheduleConfig(), T)
    x_T, z = rollout_lib.sample_noise(jax.random.PRNGKey(3), P * N, T, SHAPE)
    prompt_context = jax.random.normal(jax.random.PRNGKey(4), (P, 5, 8))
    context = jnp.repeat(prompt_context, N, axis=0)
    null = jnp.zeros((1, 5, 8))
    return schedule, x_T, z, context, null


def toy_value(x, timesteps):
    """A smooth value that prefers bright first channels, less so at noisy timesteps."""
    weight = 1.0 - timesteps.astype(jnp.float32) / 1000.0
    return weight * jnp.mean(jnp.tanh(x[:, 0] + 0.3 * x[:, 1] ** 2), axis=(1, 2))


def test_guidance_with_scale_zero_is_plain_sampling_exactly(toy):
    schedule, x_T, z, context, null = toy
    params = tiny_params()
    common = dict(eta=1.0, guidance_scale=2.0, python_loop=True)
    plain, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null, **common)
    shift = steering.value_guidance(toy_value, schedule, 0.0)
    guided, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null,
                                    eps_shift=shift, **common)
    np.testing.assert_array_equal(np.asarray(guided.x0), np.asarray(plain.x0))
    np.testing.assert_array_equal(np.asarray(guided.x_prev), np.asarray(plain.x_prev))
    moved, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null,
                                   eps_shift=steering.value_guidance(toy_value, schedule, 1.0),
                                   **common)
    assert not np.allclose(np.asarray(moved.x0), np.asarray(plain.x0))


def test_guidance_term_is_a_finite_difference_of_the_value(toy):
    schedule, x_T, _, _, _ = toy
    scale, i = 2.5, 3
    shift = steering.value_guidance(toy_value, schedule, scale)(x_T, jnp.int32(i))
    timesteps = jnp.full((x_T.shape[0],), schedule.timesteps[i], jnp.int32)
    with jax.enable_x64(True):  # central differences in float64: ~1e-9, any CPU
        x = np.asarray(x_T, np.float64)
        direction = np.random.default_rng(0).normal(size=x.shape)
        h = 1e-4
        upper = np.asarray(toy_value(jnp.asarray(x + h * direction), timesteps))
        lower = np.asarray(toy_value(jnp.asarray(x - h * direction), timesteps))
    derivative = (upper - lower) / (2 * h)  # [B]: d V_b / d h along the direction
    factor = -scale * np.sqrt(1.0 - float(schedule.alpha_t[i]))
    projected = np.sum((np.asarray(shift, np.float64) * direction).reshape(len(x), -1), axis=1)
    # float32 gradient against a float64 difference: ~1e-6 relative
    np.testing.assert_allclose(projected, factor * derivative, rtol=1e-4, atol=1e-6)
    # no guidance at step 0 (the value never sees the pure-noise state)
    first = steering.value_guidance(toy_value, schedule, scale)(x_T, jnp.int32(0))
    assert not np.any(np.asarray(first))


def test_guidance_raises_the_value_of_the_samples(toy):
    schedule, x_T, z, context, null = toy
    params = tiny_params()
    finals = []
    for scale in (0.0, 3.0):
        out, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null, eta=1.0,
                                     guidance_scale=2.0,
                                     eps_shift=steering.value_guidance(toy_value, schedule,
                                                                       scale))
        finals.append(float(jnp.mean(toy_value(out.x0, jnp.zeros((P * N,), jnp.int32)))))
    assert finals[1] > finals[0] + 0.05, finals


def test_systematic_resampling_counts():
    key = jax.random.PRNGKey(0)
    one_hot = jnp.log(jnp.asarray([[1e-12, 1.0, 1e-12, 1e-12]]))
    assert np.asarray(steering.systematic_ancestors(key, one_hot)).tolist() == [[1, 1, 1, 1]]
    uniform = jnp.zeros((2, 4))
    assert np.asarray(steering.systematic_ancestors(key, uniform)).tolist() == [[0, 1, 2, 3]] * 2
    weights = np.asarray([0.5, 0.3, 0.15, 0.05])
    for seed in range(20):
        ancestors = np.asarray(steering.systematic_ancestors(jax.random.PRNGKey(seed),
                                                             jnp.log(weights)[None]))[0]
        counts = np.bincount(ancestors, minlength=4)
        assert np.all(counts >= np.floor(4 * weights)) and np.all(counts <= np.ceil(4 * weights))
    np.testing.assert_allclose(steering.effective_sample_size(jnp.log(weights)),
                               1.0 / np.sum(weights**2), rtol=1e-6)


def test_resampling_points():
    assert steering.resampling_steps(6, 2).tolist() == [False, True, False, True, False, False]
    assert steering.resampling_steps(6, 1).tolist() == [True] * 5 + [False]
    assert not steering.resampling_steps(6, 0).any()
    with pytest.raises(ValueError, match="resample_every"):
        steering.resampling_steps(6, -1)


def _steer(toy, key, **kwargs):
    schedule, x_T, z, context, null = toy
    kwargs.setdefault("temperature", 0.05)
    return steering.steered_rollout(tiny_eps, tiny_params(), schedule, x_T, z, context, null,
                                    toy_value, key, particles=N, eta=1.0, guidance_scale=2.0,
                                    **kwargs)


def test_steered_rollout_keeps_particles_is_reproducible_and_raises_the_value(toy):
    first = _steer(toy, jax.random.PRNGKey(1))
    again = _steer(toy, jax.random.PRNGKey(1))
    other = _steer(toy, jax.random.PRNGKey(2))
    assert first.x0.shape == (P * N,) + SHAPE and first.log_weights.shape == (P * N,)
    assert first.ess.shape == (T, P) and first.resampled.shape == (T, P)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(first.resampled).any()
    assert not np.array_equal(np.asarray(first.x0), np.asarray(other.x0))
    ess = np.asarray(first.ess)
    assert np.all(ess >= 1.0 - 1e-5) and np.all(ess <= N + 1e-4)
    # Resampling only copies particles of the same prompt: each row's context is its own.
    plain = _steer(toy, jax.random.PRNGKey(1), resample_every=0)
    assert not np.asarray(plain.resampled).any()
    final = np.zeros((P * N,), np.int32)
    steered_value = steering.weighted_mean(toy_value(first.x0, final), first.log_weights, N)
    plain_value = np.asarray(toy_value(plain.x0, final)).reshape(P, N).mean(axis=1)
    assert steered_value.mean() > plain_value.mean() + 0.02, (steered_value, plain_value)


def test_resampling_stays_within_each_prompts_particles(toy):
    schedule, x_T, z, context, null = toy
    # Each prompt's particles start far from the others' (offset 10 p); a value that prefers
    # large states would pull every particle to the last prompt if groups mixed.
    offsets = jnp.repeat(10.0 * jnp.arange(P), N)[:, None, None, None]
    out = steering.steered_rollout(
        lambda params, x, t, c: jnp.zeros_like(x), None, schedule, x_T * 0.01 + offsets, z * 0.01,
        context, null, lambda x, t: jnp.mean(x, axis=(1, 2, 3)), jax.random.PRNGKey(0),
        particles=N, eta=1.0, guidance_scale=1.0, temperature=0.01)
    assert np.asarray(out.resampled).all(axis=1)[:T - 1].all()
    means = np.asarray(jnp.mean(out.x0, axis=(1, 2, 3))).reshape(P, N)
    order = np.argsort(means.mean(axis=1))
    assert order.tolist() == list(range(P)), means
    assert np.all(means.max(axis=1)[:-1] < means.min(axis=1)[1:]), means


def test_best_of_and_weighted_selection():
    scores = np.asarray([0.1, 0.9, 0.3, 2.0, -1.0, 0.0])
    assert steering.best_of(scores, 3).tolist() == [1, 3]
    with pytest.raises(ValueError, match="groups of 4"):
        steering.best_of(scores, 4)
    values = np.asarray([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(steering.weighted_mean(values, np.log([1.0, 3.0, 1.0, 1.0]), 2),
                               [2.5, 6.0])
    drawn = steering.draw_one(jax.random.PRNGKey(0), jnp.log(jnp.asarray([1e-9, 1.0, 1.0,
                                                                          1e-9])), 2)
    assert np.asarray(drawn).tolist() == [1, 2]


# --- on the tiny shapes trainer ------------------------------------------------------------------
def test_value_algorithm_trains_the_value_and_leaves_the_policy(fidelity_trainer, tmp_path):
    from tests.tiny_runs import fidelity_config
    from vard_jax.config import validate
    from vard_jax.parallel import mesh as mesh_lib
    from vard_jax.training.loop import Loop

    config = fidelity_config()
    config.algorithm = "value"
    validate(config, jax.device_count())
    loop = Loop(config, tmp_path, trainer=fidelity_trainer)
    state = fidelity_trainer.init_state()
    before = mesh_lib.to_host(state)
    state, metrics = loop.stage.epoch(state, 0, jax.random.PRNGKey(0))
    after = mesh_lib.to_host(state)
    assert int(after.policy_updates) == 0
    assert int(after.value_updates) == config.value.updates_per_epoch
    for a, b in zip(jax.tree_util.tree_leaves(after.policy_params),
                    jax.tree_util.tree_leaves(before.policy_params)):
        np.testing.assert_array_equal(a, b)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(after.value_params),
                                                  jax.tree_util.tree_leaves(before.value_params))]
    assert max(moved) > 0 and np.isfinite(metrics["value_loss"])
    assert metrics["images"] == config.sample.batch_size


def test_value_sampler_without_steering_draws_the_samplers_images(fidelity_trainer):
    """Same key, same noise: without steering, the plain sampler's images."""
    from vard_jax.training import value_sampling

    trainer = fidelity_trainer
    state = trainer.init_state()
    prompts = ["a red circle", "two blue squares"]
    key = jax.random.PRNGKey(7)
    plain = value_sampling.ValueSampler(trainer, value_sampling.SteeringSpec())
    out = plain.sample(state.policy_params, state.value_params, state.reward_stats, prompts, key)
    reference = np.asarray(trainer.rollout_batch(state.policy_params, prompts, key).images)
    # two compiled programs of the same computation: equal up to float32 rounding
    np.testing.assert_allclose(out.images, reference, atol=1e-5)
    assert out.prompts == prompts and np.all(out.log_weights == 0)


def test_guidance_and_smc_on_a_flow_schedule(toy):
    """The same steering on a flow model's grid: guidance 0 is plain sampling exactly, its
    shift is -scale * sigma * grad V, and SMC runs on the SDE steps (float timesteps)."""
    from vard_jax.diffusion import flow

    _, x_T, z, context, null = toy
    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(shift=3.0), T)
    params = tiny_params()
    common = dict(eta=0.7, guidance_scale=2.0, python_loop=True)
    plain, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null, **common)
    guided, _ = rollout_lib.rollout(tiny_eps, params, schedule, x_T, z, context, null,
                                    eps_shift=steering.value_guidance(toy_value, schedule, 0.0),
                                    **common)
    np.testing.assert_array_equal(np.asarray(guided.x0), np.asarray(plain.x0))
    i, scale = 2, 1.5
    shift = steering.value_guidance(toy_value, schedule, scale)(x_T, jnp.int32(i))
    timesteps = jnp.full((x_T.shape[0],), schedule.timesteps[i])
    gradient = jax.grad(lambda x: jnp.sum(toy_value(x, timesteps)))(x_T)
    np.testing.assert_allclose(shift, -scale * float(schedule.sigmas[i]) * gradient, rtol=1e-5,
                               atol=1e-7)
    out = steering.steered_rollout(tiny_eps, params, schedule, x_T, z, context, null,
                                   toy_value, jax.random.PRNGKey(0), particles=N, eta=0.7,
                                   guidance_scale=2.0, temperature=1.0, resample_every=1,
                                   ess_threshold=0.5)
    assert out.x0.shape == x_T.shape and np.isfinite(np.asarray(out.x0)).all()
