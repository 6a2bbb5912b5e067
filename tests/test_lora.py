"""LoRA adapters: unmerged (interceptor) and merged application agree; errors are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import base
from vard_jax.diffusion import sampler as sampler_lib
from vard_jax.models import lora, policy as policy_lib, shapes


@pytest.fixture(scope="module")
def world():
    pipeline, params, _, _ = shapes.load()
    return pipeline, params


def _perturbed(tree, seed: int, scale: float = 0.05):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def test_adapters_cover_exactly_the_target_dense_layers(world):
    _, params = world
    unet = params["unet"]
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    adapters = lora.init(unet, spec, jax.random.PRNGKey(0))
    layers = lora.target_layers(unet, spec.targets)
    assert set(flatten_dict(adapters)) == {path + (name,) for path in layers
                                           for name in ("a", "b")}
    for path, (fan_in, fan_out) in layers.items():
        node = adapters
        for key in path:
            node = node[key]
        assert node["a"].shape == (fan_in, 4) and node["b"].shape == (4, fan_out)
        assert not np.any(np.asarray(node["b"]))  # the adapted model starts as the base model
    assert {path[-1] for path in layers} == set(lora.ATTENTION_TARGETS)
    assert lora.count(adapters) == sum(4 * (i + o) for i, o in layers.values())
    assert spec.scale == 2.0


def test_unmerged_and_merged_sampling_agree(world):
    pipeline, params = world
    unet = params["unet"]
    policy = policy_lib.LoraPolicy(pipeline, lora.LoraSpec(rank=4, alpha=4.0))
    spec = sampler_lib.SamplerSpec(num_steps=2, eta=1.0, guidance_scale=3.0)
    ids = jnp.asarray(pipeline.tokenize(["a red circle on a white background",
                                         "two blue squares on a black background"]))
    key = jax.random.PRNGKey(3)

    # float32 matrix products: on GPUs the default precision is TF32 (10-bit mantissa), with
    # which the two summation orders of W x + B (A x) and (W + B A) x differ by 1e-2 here.
    @jax.jit
    @jax.default_matmul_precision("float32")
    def unmerged(adapters):
        return sampler_lib.sample(pipeline, params, policy.unet(adapters, unet), ids, key, spec,
                                  eps_fn=policy.eps_fn).images

    @jax.jit
    @jax.default_matmul_precision("float32")
    def plain(unet_params):
        return sampler_lib.sample(pipeline, params, unet_params, ids, key, spec).images

    start = policy.init(unet, jax.random.PRNGKey(0))
    reference_images = np.asarray(plain(unet))
    np.testing.assert_allclose(np.asarray(unmerged(start)), reference_images, atol=1e-4)

    trained = _perturbed(start, 1)
    via_adapters = np.asarray(unmerged(trained))
    via_merged = np.asarray(plain(policy.merged(trained, unet)))
    np.testing.assert_allclose(via_adapters, via_merged, atol=1e-4)
    assert np.abs(via_adapters - reference_images).max() > 1e-2  # the adapters do something

    # Merging changes the adapted kernels only.
    merged = policy.merged(trained, unet)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     merged, unet)
    flat = flatten_dict(changed)
    assert {path[-2] for path, moved in flat.items() if moved} == set(lora.ATTENTION_TARGETS)
    assert all(path[-1] == "kernel" for path, moved in flat.items() if moved)


def test_gradients_reach_only_the_adapters(world):
    pipeline, params = world
    unet = params["unet"]
    policy = policy_lib.LoraPolicy(pipeline, lora.LoraSpec(rank=2, alpha=2.0))
    adapters = policy.init(unet, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2,) + pipeline.sample_shape)
    ids = jnp.asarray(pipeline.tokenize(["a red circle on a white background"] * 2))
    context = pipeline.encode_ids(params["text_encoder"], ids)
    t = jnp.array([10, 500], jnp.int32)

    def loss(adapters):
        return jnp.sum(policy.eps_fn(policy.unet(adapters, unet), x, t, context) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    # At B = 0 the gradient reaches B (through A x), not A.
    flat = flatten_dict(grads)
    assert all(float(jnp.abs(g).sum()) == 0.0 for p, g in flat.items() if p[-1] == "a")
    assert any(float(jnp.abs(g).sum()) > 0.0 for p, g in flat.items() if p[-1] == "b")


def test_bad_targets_and_rank_are_one_line_errors(world):
    pipeline, params = world
    with pytest.raises(ValueError) as error:
        lora.init(params["unet"], lora.LoraSpec(rank=2, alpha=2.0, targets=("to_x",)),
                  jax.random.PRNGKey(0))
    message = str(error.value)
    assert "\n" not in message and "'to_x'" in message and "to_q" in message
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.init(params["unet"], lora.LoraSpec(rank=0, alpha=1.0), jax.random.PRNGKey(0))


def test_policy_from_config(world):
    pipeline, _ = world
    config = base.get_config()
    assert isinstance(policy_lib.make(config.policy, pipeline), policy_lib.FullPolicy)
    config.policy.lora_rank = 8
    config.policy.lora_targets = "to_q, to_v"
    made = policy_lib.make(config.policy, pipeline)
    assert isinstance(made, policy_lib.LoraPolicy)
    assert made.spec.targets == ("to_q", "to_v") and made.spec.scale == 1.0  # alpha 0 = rank
