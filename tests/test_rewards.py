"""The reward registry, host rewards, weighted sums and the checks on what rewards return."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vard_jax.rewards import registry
from vard_jax.rewards.host_rewards import jpeg_sizes_kb


def test_registry_lists_and_parses():
    names = registry.names()
    for name in ("clip_alignment", "shape_fidelity", "jpeg_compressibility", "jpeg_incompressibility"):
        assert name in names
    assert registry.parse_spec("clip_alignment:1.0, shape_fidelity:0.5") == [
        ("clip_alignment", 1.0), ("shape_fidelity", 0.5)]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        registry.parse_spec("nope")
    with pytest.raises(ValueError, match="named twice"):
        registry.parse_spec("shape_fidelity,shape_fidelity:2")


def test_jpeg_compressibility_orders_images():
    flat = np.full((1, 32, 32, 3), 0.5, np.float32)
    noise = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    sizes = jpeg_sizes_kb(np.concatenate([flat, noise]))
    buffer = io.BytesIO()
    Image.fromarray((noise[0] * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert sizes[1] == pytest.approx(buffer.tell() / 1000.0)
    assert sizes[0] < sizes[1]
    reward = registry.build("jpeg_compressibility", registry.RewardContext())
    assert not reward.differentiable and not reward.jittable
    values, _ = registry.RewardEvaluator(reward)(np.concatenate([flat, noise]), ["a", "b"])
    np.testing.assert_allclose(values, -sizes)
    inverse = registry.build("jpeg_incompressibility", registry.RewardContext())
    np.testing.assert_allclose(registry.RewardEvaluator(inverse)(noise, ["x"])[0], sizes[1:])


def _constant_reward(name, value, jittable=True):
    score = (lambda images, data: jnp.full((images.shape[0],), value)) if jittable else \
        (lambda images, prompts: np.full((len(prompts),), value))
    return registry.Reward(name=name, score=score, differentiable=jittable, jittable=jittable,
                           prepare=lambda prompts: np.zeros((len(prompts),), np.int32))


def test_weighted_sum_reports_parts():
    total = registry.weighted_sum(((_constant_reward("a", 2.0), 1.0),
                                   (_constant_reward("b", 3.0, jittable=False), 0.5)))
    assert not total.jittable and not total.differentiable
    values, parts = registry.RewardEvaluator(total)(np.zeros((2, 4, 4, 3), np.float32), ["p", "q"])
    np.testing.assert_allclose(values, [3.5, 3.5])
    np.testing.assert_allclose(parts["a"], [2.0, 2.0])
    np.testing.assert_allclose(parts["b"], [3.0, 3.0])
    assert total.name == "a:1,b:0.5"


@pytest.mark.parametrize("score, message", [
    (lambda images, prompts: np.zeros((len(prompts), 2)), "returned shape (2, 2); expected (2,)"),
    (lambda images, prompts: np.array([0.0, np.nan]), "returned non-finite values [nan]"),
    (lambda images, prompts: np.array(["a", "b"]), "returned dtype <U1"),
    (lambda images, prompts: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_reward_outputs_are_clear_errors(score, message):
    reward = registry.Reward(name="broken", score=score, differentiable=False, jittable=False)
    with pytest.raises(registry.RewardError) as error:  # main.py reports it as one line
        registry.RewardEvaluator(reward)(np.zeros((2, 4, 4, 3), np.float32), ["p", "q"])
    assert "reward 'broken'" in str(error.value) and message in str(error.value)
