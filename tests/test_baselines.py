"""DDPO and DRaFT/AlignProp losses on the tiny differentiable noise model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vard_jax.algorithms import advantages as advantages_lib, ddpo, draft
from vard_jax.diffusion import ddim, rollout as rollout_lib
from vard_jax.diffusion.schedule import NoiseScheduleConfig, make_ddim_schedule
from vard_jax.rewards.registry import Reward

from tests.test_diffusion import tiny_eps, tiny_params

SHAPE = (2, 4, 4)
T = 5
B = 3
ETA = 1.0
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def schedule():
    return make_ddim_schedule(NoiseScheduleConfig(), T)


@pytest.fixture(scope="module")
def inputs():
    x_T, noise = rollout_lib.sample_noise(jax.random.PRNGKey(0), B, T, SHAPE)
    return draft.DraftInputs(context=jax.random.normal(jax.random.PRNGKey(1), (B, 5, 8)),
                             null_context=jnp.zeros((1, 5, 8)), x_T=x_T, noise=noise)


def _rollout(schedule, inputs, params, **kwargs):
    return rollout_lib.rollout(tiny_eps, params, schedule, inputs.x_T, inputs.noise,
                               inputs.context, inputs.null_context, eta=ETA,
                               guidance_scale=GUIDANCE, **kwargs)


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


# --- DDPO ---------------------------------------------------------------------------------------


def _float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        tree)


@pytest.fixture
def x64(schedule, inputs):
    """(schedule, inputs, params) in float64, inside ``jax.enable_x64``.

    These tests check that the loss recomputes the rollout's log-densities with the same
    formula. In float32 the two differ by rounding that depends on the CPU and the batch layout:
    log p has terms (x_prev - mu)^2 / (2 sigma^2) whose rounding error grows like
    eps32 * |mu| / sigma, 1e-5 relative at the smallest sigma here. In float64 that is ~1e-13,
    so a 1e-9 relative tolerance holds on any machine and still catches a wrong formula. That
    the float32 training step sees ratio 1 is checked at the trainer level
    (tests/test_algorithms.py), where it holds by construction.
    """
    with jax.enable_x64(True):
        yield _float64(schedule), _float64(inputs), _float64(tiny_params())


def test_recomputed_log_probs_match_rollout_and_ratio_is_one(x64):
    schedule, inputs, params = x64
    traj, _ = _rollout(schedule, inputs, params)
    assert traj.log_prob.dtype == jnp.float64
    advantages = jnp.array([1.0, -0.5, 2.0])
    batch = ddpo.transitions_from_trajectory(traj, advantages, inputs.context,
                                             inputs.null_context, reduce="sum")
    assert batch.size == B * T
    # Shuffle so one call mixes steps and chains.
    batch = batch.take(np.random.default_rng(0).permutation(batch.size))
    new = ddpo.transition_log_prob(tiny_eps, params, schedule, batch.x_t, batch.step_index,
                                   batch.x_prev, batch.context, batch.null_context, ETA, GUIDANCE)
    np.testing.assert_allclose(new, batch.old_log_prob, rtol=1e-9, atol=1e-9)
    # A scalar step index gives the same values as the per-sample gather.
    step = 2
    scalar = ddpo.transition_log_prob(tiny_eps, params, schedule, traj.x_t[:, step], step,
                                      traj.x_prev[:, step], inputs.context, inputs.null_context,
                                      ETA, GUIDANCE)
    np.testing.assert_allclose(scalar, traj.log_prob[:, step], rtol=1e-9, atol=1e-9)

    config = ddpo.DDPOConfig(clip_range=1e-4, eta=ETA, guidance_scale=GUIDANCE, reduce="sum")
    loss, metrics = ddpo.ddpo_loss(tiny_eps, params, schedule, batch, config)
    # Advantages are stored in float32 (transitions_from_trajectory): the loss is float32-exact.
    np.testing.assert_allclose(loss, -jnp.mean(batch.advantages), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-9)
    assert float(metrics["clipfrac"]) == 0.0 and float(metrics["approx_kl"]) < 1e-16

    # At the sampling parameters the gradient is the policy gradient -mean(A grad log p).
    grad = jax.grad(lambda p: ddpo.ddpo_loss(tiny_eps, p, schedule, batch, config)[0])(params)
    expected = jax.grad(lambda p: -jnp.mean(batch.advantages * ddpo.transition_log_prob(
        tiny_eps, p, schedule, batch.x_t, batch.step_index, batch.x_prev, batch.context,
        batch.null_context, ETA, GUIDANCE)))(params)
    _assert_trees_close(grad, expected, rtol=1e-7, atol=1e-9)
    assert float(jnp.abs(grad["bias"]).sum()) > 0


def test_mean_reduction_and_stochastic_steps(x64):
    schedule, inputs, params = x64
    traj, _ = _rollout(schedule, inputs, params)
    steps = ddpo.stochastic_steps(schedule, ETA)
    np.testing.assert_array_equal(steps, np.arange(T - 1))  # the last step lands on alpha = 1
    batch = ddpo.transitions_from_trajectory(traj, jnp.zeros(B), inputs.context,
                                             inputs.null_context, steps=steps, reduce="mean")
    assert batch.size == B * (T - 1)
    np.testing.assert_array_equal(batch.step_index[: T - 1], steps)
    np.testing.assert_allclose(batch.old_log_prob[: T - 1],
                               traj.log_prob[0, : T - 1] / np.prod(SHAPE), rtol=1e-12)
    new = ddpo.transition_log_prob(tiny_eps, params, schedule, batch.x_t, batch.step_index,
                                   batch.x_prev, batch.context, batch.null_context, ETA, GUIDANCE,
                                   reduce="mean")
    np.testing.assert_allclose(new, batch.old_log_prob, rtol=1e-9, atol=1e-9)


def test_ppo_clipping_stops_the_gradient():
    clip = 0.2
    old = jnp.zeros(4)
    advantages = jnp.array([1.0, -1.0, 1.0, -1.0])
    # ratio 1.5 > 1 + c with A > 0, ratio 0.5 < 1 - c with A < 0: clipped, no gradient.
    # ratio 1.1 and 0.9: inside the range, gradient -A r / N.
    new = jnp.log(jnp.array([1.5, 0.5, 1.1, 0.9]))
    loss, metrics = ddpo.ppo_loss(new, old, advantages, clip)
    expected = np.mean([-1.2, 0.8, -1.1, 0.9])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], 0.5)
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], 0.5 * np.mean(np.asarray(new) ** 2), rtol=1e-6)
    grad = jax.grad(lambda n: ddpo.ppo_loss(n, old, advantages, clip)[0])(new)
    np.testing.assert_allclose(grad, [0.0, 0.0, -1.1 / 4, 0.9 / 4], rtol=1e-6, atol=1e-12)
    # The pessimistic side is never clipped: ratio 1.5 with A < 0 keeps its gradient.
    grad = jax.grad(lambda n: ddpo.ppo_loss(n, jnp.zeros(1), -jnp.ones(1), clip)[0])(
        jnp.log(jnp.array([1.5])))
    np.testing.assert_allclose(grad, [1.5], rtol=1e-6)
    # Advantage clipping.
    loss, _ = ddpo.ppo_loss(jnp.zeros(2), jnp.zeros(2), jnp.array([5.0, -0.5]), clip, adv_clip=1.0)
    np.testing.assert_allclose(loss, -np.mean([1.0, -0.5]), rtol=1e-6)


def test_per_prompt_advantages():
    rewards = np.array([1.0, 2.0, 4.0, 10.0, 20.0, 7.0, -3.0, 0.5])
    prompts = ["a", "a", "a", "b", "b", "c", "a", "b"]
    advantages = advantages_lib.per_prompt_advantages(rewards, prompts)
    assert advantages.dtype == np.float32 and advantages.shape == (8,)
    ids = np.asarray(prompts)
    for prompt in ["a", "b"]:
        group = advantages[ids == prompt]
        np.testing.assert_allclose(group.mean(), 0.0, atol=1e-6)
        np.testing.assert_allclose(group.std(), 1.0, atol=1e-5)
    # "c" has one sample: standardised with the batch's statistics.
    np.testing.assert_allclose(advantages[5], (7.0 - rewards.mean()) / rewards.std(), rtol=1e-5)
    # Integer ids work the same, and min_count above every group gives global standardisation.
    as_ints = advantages_lib.per_prompt_advantages(rewards, np.array([0, 0, 0, 1, 1, 2, 0, 1]))
    np.testing.assert_allclose(as_ints, advantages)
    global_only = advantages_lib.per_prompt_advantages(rewards, prompts, min_count=10)
    np.testing.assert_allclose(global_only, (rewards - rewards.mean()) / rewards.std(), rtol=1e-5)


def test_stat_tracker_keeps_each_prompts_last_rewards_across_epochs():
    """A hand-worked sequence: buffers of 3, statistics from 2 rewards of a prompt on."""
    tracker = advantages_lib.PromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    batch = np.array([1.0, 2.0, 10.0])
    first = tracker.advantages(batch, ["a", "a", "b"])
    # a: buffer [1, 2] -> mean 1.5, std 0.5; b: one reward < min_count -> the batch's statistics.
    np.testing.assert_allclose(first, [-1.0, 1.0, (10.0 - batch.mean()) / batch.std()],
                               rtol=1e-6)
    second = tracker.advantages(np.array([4.0, 6.0]), ["a", "b"])
    # a: [1, 2, 4] -> mean 7/3, std sqrt(42/27); b: [10, 6] -> mean 8, std 2.
    np.testing.assert_allclose(second, [(4.0 - 7.0 / 3.0) / np.sqrt(42.0 / 27.0), -1.0],
                               rtol=1e-6)
    saved = json.loads(json.dumps(tracker.state_dict()))  # what a checkpoint carries
    assert saved == {"a": [1.0, 2.0, 4.0], "b": [10.0, 6.0]}
    third = tracker.advantages(np.array([0.0, 0.0]), ["a", "a"])
    # a keeps its last 3: [4, 0, 0] -> mean 4/3, std sqrt(96/27).
    np.testing.assert_allclose(third, [-(4.0 / 3.0) / np.sqrt(96.0 / 27.0)] * 2, rtol=1e-6)
    resumed = advantages_lib.PromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    resumed.load_state_dict(saved)
    np.testing.assert_array_equal(resumed.advantages(np.array([0.0, 0.0]), ["a", "a"]), third)
    # A pair of one epoch no longer gets +-1 whatever its gap (ddpo-pytorch's min_count 16):
    # below min_count the batch's statistics keep the gap's size.
    tracker = advantages_lib.PromptStatTracker()
    rewards = np.array([0.0, 0.1, 5.0, 9.0])
    advantages = tracker.advantages(rewards, ["a", "a", "b", "b"])
    np.testing.assert_allclose(advantages, (rewards - rewards.mean()) / (rewards.std() + 1e-6),
                               rtol=1e-6)
    # buffer_size 0: this batch's rewards of each prompt only, as per_prompt_advantages.
    epoch_only = advantages_lib.PromptStatTracker(buffer_size=0, min_count=2)
    prompts = ["a", "a", "b", "b"]
    for _ in range(2):
        np.testing.assert_array_equal(epoch_only.advantages(rewards, prompts),
                                      advantages_lib.per_prompt_advantages(rewards, prompts))
    assert epoch_only.state_dict() == {}


def test_first_step_at_the_sampling_parameters_has_ratio_one_by_construction(schedule, inputs):
    params = tiny_params()
    traj, _ = _rollout(schedule, inputs, params)
    batch = ddpo.transitions_from_trajectory(traj, jnp.array([1.0, -1.0, 0.5]), inputs.context,
                                             inputs.null_context, reduce="sum")
    # Old log-probs off by far more than the clip range (another computation's rounding, made
    # big: summed over dimensions, a recomputation alone can differ by ~1e-3 in float32).
    batch = batch._replace(old_log_prob=batch.old_log_prob + 0.05)
    config = ddpo.DDPOConfig(clip_range=1e-4, eta=ETA, guidance_scale=GUIDANCE, reduce="sum")
    _, off = ddpo.ddpo_loss(tiny_eps, params, schedule, batch, config)
    assert float(off["clipfrac"]) == 1.0
    _, at_sampling = jax.jit(lambda p: ddpo.ddpo_loss(tiny_eps, p, schedule, batch, config,
                                                      jnp.bool_(True)))(params)
    assert float(at_sampling["log_ratio_max"]) == 0.0 and float(at_sampling["clipfrac"]) == 0.0


def test_plan_by_timestep_accumulates_every_step_of_its_chains():
    chains, steps = 6, 3
    plan = ddpo.plan_updates(np.random.default_rng(0), chains, steps, minibatch_size=2)
    assert len(plan) == ddpo.updates_per_pass(chains, steps, 2) == 3
    seen = []
    for indices in plan:
        assert indices.shape == (steps, 2)
        chain_ids, step_ids = indices // steps, indices % steps
        # Each micro-batch: distinct chains, the same chains throughout the optimiser step,
        # each of them at every step exactly once.
        assert all(len(set(row)) == 2 for row in chain_ids)
        assert all(set(row) == set(chain_ids[0]) for row in chain_ids)
        for column in range(2):
            assert sorted(step_ids[:, column]) == list(range(steps))
        seen += indices.ravel().tolist()
    assert sorted(seen) == list(range(chains * steps))
    # Two minibatches per optimiser step; a third is left over (not trained this pass).
    plan = ddpo.plan_updates(np.random.default_rng(0), chains, steps, 2, accumulation=2)
    assert len(plan) == ddpo.updates_per_pass(chains, steps, 2, 2) == 1
    assert plan[0].shape == (2 * steps, 2) and len(set(plan[0].ravel())) == 4 * steps
    # Shuffled: the step order differs between chains for some seed.
    orders = {tuple(p[:, 0] % steps) for seed in range(5)
              for p in ddpo.plan_updates(np.random.default_rng(seed), chains, steps, 2)}
    assert len(orders) > 1


def test_plan_of_random_transitions():
    plan = ddpo.plan_updates(np.random.default_rng(1), 4, 3, minibatch_size=5, accumulation=2,
                             by_timestep=False)
    assert len(plan) == ddpo.updates_per_pass(4, 3, 5, 2, by_timestep=False) == 1
    assert plan[0].shape == (2, 5) and len(set(plan[0].ravel())) == 10
    assert ddpo.plan_updates(np.random.default_rng(1), 4, 3, 5, 3, by_timestep=False) == []


def test_accumulated_gradient_is_the_mean_over_micro_batches():
    def loss_fn(params, batch):
        loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
        return loss, {"log_ratio_max": jnp.max(batch["y"]), "value": loss}

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 2))
    y = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    params = {"w": jnp.array([0.5, -1.0])}
    loss, metrics, grads = jax.jit(ddpo.accumulated_gradient, static_argnums=0)(
        loss_fn, params, {"x": x, "y": y})
    expected = jax.grad(lambda p: jnp.mean(jnp.stack(
        [loss_fn(p, {"x": x[i], "y": y[i]})[0] for i in range(3)])))(params)
    np.testing.assert_allclose(grads["w"], expected["w"], rtol=1e-5)
    losses = [float(loss_fn(params, {"x": x[i], "y": y[i]})[0]) for i in range(3)]
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["value"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["log_ratio_max"], np.max(np.asarray(y)), rtol=1e-6)


def test_ddpo_requires_a_stochastic_sampler(schedule, inputs):
    params = tiny_params()
    traj, _ = _rollout(schedule, inputs, params)
    batch = ddpo.transitions_from_trajectory(traj, jnp.zeros(B), inputs.context,
                                             inputs.null_context)
    config = ddpo.DDPOConfig(clip_range=1e-4, eta=0.0, guidance_scale=GUIDANCE)
    with pytest.raises(ValueError, match="eta > 0"):
        ddpo.ddpo_loss(tiny_eps, params, schedule, batch, config)
    with pytest.raises(ValueError, match="reduce"):
        ddpo.ddpo_loss(tiny_eps, params, schedule, batch, config._replace(eta=1.0, reduce="max"))


# --- DRaFT / AlignProp ------------------------------------------------------------------------


def reward_fn(x0):
    return jnp.mean(jnp.sin(3.0 * x0) + x0**2, axis=(1, 2, 3))


def _config(depth, beta=0.0):
    return draft.DraftConfig(grad_depth=depth, beta=beta, eta=ETA, guidance_scale=GUIDANCE)


def _draft_grad(schedule, inputs, params, reference, depth, beta=0.0):
    return jax.grad(lambda p: draft.draft_loss(tiny_eps, p, reference, schedule, inputs,
                                               reward_fn, _config(depth, beta))[0])(params)


def test_draft_k1_is_one_step_from_the_fixed_state(schedule, inputs):
    params = tiny_params(1)
    grads = _draft_grad(schedule, inputs, params, None, depth=1)  # beta = 0: no reference
    traj, _ = _rollout(schedule, inputs, params)
    x_start = traj.x_t[:, T - 1]

    def last_step_loss(p):
        eps = ddim.guided_eps(tiny_eps, p, x_start, traj.timesteps[:, T - 1], inputs.context,
                              inputs.null_context, GUIDANCE)
        x0 = ddim.ddim_step(schedule, T - 1, x_start, eps, inputs.noise[:, T - 1], ETA).x_prev
        return -jnp.mean(reward_fn(x0))

    _assert_trees_close(grads, jax.grad(last_step_loss)(params))


def test_draft_full_depth_is_full_backprop(schedule, inputs):
    params = tiny_params(2)
    full = jax.grad(lambda p: -jnp.mean(reward_fn(_rollout(schedule, inputs, p)[0].x0)))(params)
    _assert_trees_close(_draft_grad(schedule, inputs, params, None, depth=T), full)
    _assert_trees_close(_draft_grad(schedule, inputs, params, None, depth=None), full)
    assert not np.allclose(_draft_grad(schedule, inputs, params, None, depth=1)["scale"],
                           full["scale"], rtol=1e-3)


def test_draft_kl_vanishes_at_the_reference(schedule, inputs):
    params = tiny_params(3)
    loss0, _ = draft.draft_loss(tiny_eps, params, params, schedule, inputs, reward_fn,
                                _config(2, 0.0))
    loss1, metrics = draft.draft_loss(tiny_eps, params, params, schedule, inputs, reward_fn,
                                      _config(2, 5.0))
    np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
    np.testing.assert_allclose(metrics["eps_distance"], 0.0, atol=1e-12)
    _assert_trees_close(_draft_grad(schedule, inputs, params, params, 2, beta=5.0),
                        _draft_grad(schedule, inputs, params, None, 2, beta=0.0))
    # Away from the reference the KL term contributes and pulls the bias back.
    reference = dict(params, bias=params["bias"] - jnp.array([0.2, -0.2]))
    with_kl = _draft_grad(schedule, inputs, params, reference, 2, beta=5.0)
    without = _draft_grad(schedule, inputs, params, reference, 2, beta=0.0)
    difference = with_kl["bias"] - without["bias"]
    assert float(difference[0]) > 0 and float(difference[1]) < 0


@pytest.mark.parametrize("unroll", [True, 1], ids=["unrolled", "loop"])
@pytest.mark.parametrize("kl_on", ["guided", "conditional"])
def test_random_depth_matches_static_depth(schedule, inputs, unroll, kl_on):
    """The drawn depth's gradient (one compiled function for every K; reverse mode by hand
    when looped, the where-selected cut when unrolled) equals jax.grad of DRaFT at the static
    K, with the KL term."""
    params = tiny_params(4)
    reference = dict(params, bias=params["bias"] + 0.1)
    config = _config(None, 0.5)._replace(unroll=unroll, kl_on=kl_on)

    @jax.jit
    def by_hand(p, depth):
        return draft.draft_value_and_grad_random_depth(tiny_eps, p, reference, schedule, inputs,
                                                       reward_fn, config, depth)

    for depth in [1, 3, T]:
        (loss, metrics), static = jax.value_and_grad(
            lambda p: draft.draft_loss(tiny_eps, p, reference, schedule, inputs, reward_fn,
                                       config._replace(grad_depth=depth)), has_aux=True)(params)
        drawn_loss, drawn_metrics, grads = by_hand(params, jnp.int32(depth))
        # float32 sums in another order: relative 1e-4 (tiny_eps' gradients are O(1-100)).
        _assert_trees_close(grads, static)
        assert float(drawn_loss) == pytest.approx(float(loss), rel=1e-5)
        for name in ("reward_mean", "eps_distance", "grad_depth"):
            assert float(drawn_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-5)
    depths = {int(draft.sample_depth(jax.random.PRNGKey(seed), T, low=2, high=4))
              for seed in range(20)}
    assert depths == {2, 3, 4}
    with pytest.raises(ValueError):
        draft.sample_depth(jax.random.PRNGKey(0), T, low=0)


def test_random_depth_differentiates_only_the_trainable_parameters(schedule, inputs):
    """``model_params`` maps the trained parameters (here the bias alone, as LoRA adapters
    are) into the model's: the gradient has their structure and equals jax.grad through it."""
    params = tiny_params(6)
    frozen = {name: value for name, value in params.items() if name != "bias"}

    def model_params(trainable):
        return dict(frozen, bias=trainable["bias"])

    config = _config(None, 0.5)
    _, _, grads = draft.draft_value_and_grad_random_depth(
        tiny_eps, {"bias": params["bias"]}, params, schedule, inputs, reward_fn, config,
        jnp.int32(2), model_params=model_params)
    expected = jax.grad(lambda b: draft.draft_loss(
        tiny_eps, model_params(b), params, schedule, inputs, reward_fn,
        config._replace(grad_depth=2))[0])({"bias": params["bias"]})
    assert set(grads) == {"bias"}
    _assert_trees_close(grads, expected)


def test_check_reward():
    score = lambda images, prepared: jnp.zeros(images.shape[0])  # noqa: E731
    draft.check_reward(Reward(name="smooth", score=score, differentiable=True, jittable=True))
    host = Reward(name="ocr", score=score, differentiable=False, jittable=False)
    with pytest.raises(ValueError, match="draft needs a differentiable reward; 'ocr' is not"):
        draft.check_reward(host)


def test_random_depth_backpropagates_through_the_drawn_steps_only(schedule, inputs):
    """AlignProp's looped form costs what the drawn K needs: T forward calls (the chain
    without gradient), then K steps recomputed and pulled back. The unrolled form (CPU)
    differentiates every step: T backward calls, whatever K is."""
    from tests.test_vard_losses import _counting_model

    params = tiny_params(5)
    for unroll in (1, True):
        for depth in (1, 3):
            counts = {}
            model = _counting_model(counts)
            config = _config(None)._replace(unroll=unroll)

            @jax.jit
            def grad(p, k):
                return draft.draft_value_and_grad_random_depth(
                    model, p, None, schedule, inputs, reward_fn, config, k)[2]

            jax.block_until_ready(grad(params, jnp.int32(depth)))
            if unroll is True:  # (debug callbacks of unrolled forward rules may be merged)
                assert counts["backward"] == T, (depth, counts)
            else:
                assert counts == {"forward": T + depth, "backward": depth}, (depth, counts)


# --- Flow-GRPO ------------------------------------------------------------------------------


def test_group_advantages():
    rewards = np.array([1.0, 3.0, 0.0, 10.0, 2.0, 2.0])
    global_std = advantages_lib.group_advantages(rewards, 2, global_std=True, eps=0.0)
    np.testing.assert_allclose(global_std, np.array([-1, 1, -5, 5, 0, 0]) / rewards.std(),
                               rtol=1e-6)
    per_group = advantages_lib.group_advantages(rewards, 2, global_std=False, eps=1e-4)
    np.testing.assert_allclose(per_group, [-1 / 1.0001, 1 / 1.0001, -5 / 5.0001, 5 / 5.0001,
                                           0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="not whole groups of 4"):
        advantages_lib.group_advantages(rewards, 4)


def test_grpo_kl_to_the_reference_on_flow_steps():
    """On a flow schedule's SDE steps: the KL term is 0 at the reference, equals the kernels'
    KL by hand otherwise, and adds beta times its gradient; ratio 1 at the sampling params."""
    from vard_jax.diffusion import flow

    schedule = flow.make_flow_schedule(flow.FlowMatchConfig(shift=3.0), T)
    x_T, noise = rollout_lib.sample_noise(jax.random.PRNGKey(3), B, T, SHAPE)
    context = jax.random.normal(jax.random.PRNGKey(4), (B, 5, 8))
    null = jnp.zeros((1, 5, 8))
    reference = tiny_params()
    policy = jax.tree_util.tree_map(lambda a: a + 0.05, reference)
    eta = 0.7
    traj, _ = rollout_lib.rollout(tiny_eps, policy, schedule, x_T, noise, context, null,
                                  eta=eta, guidance_scale=GUIDANCE)
    steps = ddpo.stochastic_steps(schedule, eta)
    assert list(steps) == list(range(T))  # every SDE step has a density, the last too
    batch = ddpo.transitions_from_trajectory(traj, jnp.array([1.0, -1.0, 0.5]), context, null,
                                             reduce="mean")
    config = ddpo.DDPOConfig(clip_range=1e-4, eta=eta, guidance_scale=GUIDANCE, kl_beta=0.5)
    loss_at_ref, metrics = ddpo.ddpo_loss(tiny_eps, reference, schedule, batch, config, True,
                                          (tiny_eps, reference))
    assert float(metrics["kl_to_reference"]) == 0.0 and float(metrics["log_ratio_max"]) == 0.0
    loss, metrics = ddpo.ddpo_loss(tiny_eps, policy, schedule, batch, config, True,
                                   (tiny_eps, reference))
    args = (batch.x_t, batch.step_index, batch.context, batch.null_context, eta, GUIDANCE)
    mean, std = ddpo.transition_mean(tiny_eps, policy, schedule, *args)
    ref_mean, ref_std = ddpo.transition_mean(tiny_eps, reference, schedule, *args)
    np.testing.assert_array_equal(std, ref_std)
    by_hand = np.mean([np.mean((np.asarray(mean[n]) - np.asarray(ref_mean[n])) ** 2)
                       / (2 * float(std[n]) ** 2) for n in range(batch.size)])
    np.testing.assert_allclose(metrics["kl_to_reference"], by_hand, rtol=1e-5)
    assert by_hand > 0 and float(metrics["log_ratio_max"]) == 0.0
    np.testing.assert_allclose(loss, -jnp.mean(batch.advantages) + 0.5 * by_hand, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the reference model"):
        ddpo.ddpo_loss(tiny_eps, policy, schedule, batch, config)
    # The KL's gradient is beta times that of the mean kernel KL.
    plain = config._replace(kl_beta=0.0)

    def kl(p):
        m, s = ddpo.transition_mean(tiny_eps, p, schedule, *args)
        return jnp.mean(ddpo.kernel_kl(m, ref_mean, s))

    grad = jax.grad(lambda p: ddpo.ddpo_loss(tiny_eps, p, schedule, batch, config, True,
                                             (tiny_eps, reference))[0])(policy)
    grad_plain = jax.grad(lambda p: ddpo.ddpo_loss(tiny_eps, p, schedule, batch, plain,
                                                   True)[0])(policy)
    grad_kl = jax.grad(kl)(policy)
    for name in grad:
        np.testing.assert_allclose(grad[name], grad_plain[name] + 0.5 * grad_kl[name],
                                   rtol=1e-4, atol=1e-7)
