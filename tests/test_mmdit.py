"""The project's SD3 / SD 3.5 MMDiT against diffusers' ``SD3Transformer2DModel``.

``tests/reference/data/mmdit_*`` hold diffusers' outputs for two tiny random configurations
(SD 3: joint attention; SD 3.5 Medium: RMS query/key norm and MMDiT-X's extra self-attention),
each on a square and a non-square latent (centre crops of the position table), written by
``tests/reference/make_reference.py``. The tests write the same weights as a PyTorch-layout
safetensors checkpoint, load it with ``weights.load_sd3_transformer`` and compare.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import weights as reference_weights
from vard_jax.models import lora
from vard_jax.models.nn import mmdit
from vard_jax.models.nn import weights as weights_lib

DATA = pathlib.Path(__file__).resolve().parent / "reference" / "data"
CASES = ("mmdit_sd3", "mmdit_sd35")


def _case(name: str, directory: pathlib.Path, variant: str = "", table: bool = True):
    """Writes the reference checkpoint (with diffusers' position table unless ``table`` is
    False) to ``directory``; returns its record and the reference arrays."""
    record = json.loads((DATA / f"{name}.json").read_text())
    arrays = dict(np.load(DATA / f"{name}.npz"))
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    if table:
        state[mmdit.POSITION_KEY] = arrays["pos_embed"]
    weights_lib.save_state_dict(directory, record["config"], state,
                                weights_lib.DIFFUSERS_WEIGHTS, variant)
    return record, arrays


def _inputs(arrays: dict, sample: str) -> tuple:
    return (arrays[f"{sample}/hidden_states"], arrays["encoder_hidden_states"],
            arrays["pooled_projections"], arrays["timestep"])


def _close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("name,variant,implementation", [
    ("mmdit_sd3", "", "xla"), ("mmdit_sd35", "fp16", "xla"), ("mmdit_sd35", "", "chunked")])
def test_mmdit_matches_diffusers(name, variant, implementation, tmp_path):
    record, arrays = _case(name, tmp_path, variant)
    if variant:
        assert (tmp_path / f"diffusion_pytorch_model.{variant}.safetensors").is_file()
    model, params = weights_lib.load_sd3_transformer(tmp_path, implementation=implementation,
                                                     variant=variant)
    assert model.config.to_dict() == mmdit.MMDiTConfig.from_dict(record["config"]).to_dict()
    apply = jax.jit(model.apply)
    for sample in record["samples"]:
        out = apply({"params": params}, *_inputs(arrays, sample))
        assert out.dtype == jnp.float32
        _close(out, arrays[f"{sample}/out"])


def test_position_table_is_diffusers_and_the_checkpoint_s_own_is_used(tmp_path):
    """Without ``pos_embed.pos_embed`` in the checkpoint the loader fills in the table diffusers
    computes; with one, that table is used (as diffusers loads its persistent buffer)."""
    record, arrays = _case("mmdit_sd3", tmp_path, table=False)
    model, params = weights_lib.load_sd3_transformer(tmp_path)
    _close(params["pos_embed"]["pos_embed"], arrays["pos_embed"], tol=1e-6)
    _close(model.apply({"params": params}, *_inputs(arrays, "wide")), arrays["wide/out"])
    state = reference_weights.state_dict(record["shapes"], record["seed"])
    state[mmdit.POSITION_KEY] = arrays["pos_embed"][:, ::-1] * 0.5
    weights_lib.save_state_dict(tmp_path, record["config"], state, weights_lib.DIFFUSERS_WEIGHTS)
    _, params = weights_lib.load_sd3_transformer(tmp_path)
    np.testing.assert_array_equal(params["pos_embed"]["pos_embed"], state[mmdit.POSITION_KEY])


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_computation_stays_within_bfloat16_tolerance(name, tmp_path):
    _, arrays = _case(name, tmp_path)
    model, params = weights_lib.load_sd3_transformer(tmp_path, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": params}, *_inputs(arrays, "wide"))
    assert out.dtype == jnp.bfloat16
    got = np.asarray(out, np.float32)
    _close(got, arrays["wide/out"], tol=3e-2)
    assert np.abs(got - arrays["wide/out"]).max() > 1e-4  # and it is not float32


@pytest.mark.parametrize("field,value", [("qk_norm", "layer_norm"),
                                         ("_class_name", "FluxTransformer2DModel"),
                                         ("caption_projection_dim", 24),
                                         ("pos_embed_max_size", None)])
def test_unsupported_config_stops_with_one_line(field, value, tmp_path):
    record = json.loads((DATA / "mmdit_sd35.json").read_text())
    config = dict(record["config"], **{field: value})
    weights_lib.save_state_dict(tmp_path, config, {}, weights_lib.DIFFUSERS_WEIGHTS)
    with pytest.raises(ValueError) as error:
        weights_lib.load_sd3_transformer(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.json'}: {field}=")
    assert "not supported" in message


def test_latents_larger_than_the_position_table_are_refused():
    config = mmdit.MMDiTConfig.from_dict(json.loads((DATA / "mmdit_sd3.json").read_text())[
        "config"])
    model = mmdit.SD3Transformer2DModel(config)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"17 x 4 patches exceed the position table"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 4, 34, 8)),
                       jnp.zeros((1, 5, 24)), jnp.zeros((1, 12)), jnp.zeros((1,)))


def test_remat_of_the_named_block_outputs_keeps_the_gradient(tmp_path):
    """Saving only the activations named ``transformer`` (the blocks' outputs, both streams)
    and recomputing the rest: the same gradient as without remat; the position table, a
    buffer in diffusers, gets none."""
    _, arrays = _case("mmdit_sd3", tmp_path)
    model, params = weights_lib.load_sd3_transformer(tmp_path)
    inputs = _inputs(arrays, "wide")

    def loss(params):
        return jnp.sum(model.apply({"params": params}, *inputs) ** 2)

    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert "name=transformer" in jaxpr and "name=attention" in jaxpr
    policy = jax.checkpoint_policies.save_only_these_names("transformer")
    plain = jax.jit(jax.value_and_grad(loss))(params)
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(loss, policy=policy)))(params)
    _close(remat[0], plain[0])
    jax.tree_util.tree_map(_close, remat[1], plain[1])
    assert not np.any(np.asarray(plain[1]["pos_embed"]["pos_embed"]))


def test_lora_finds_the_attention_projections_of_both_streams():
    """Parameter names are the checkpoint's: LoRA targets diffusers' names."""
    config = mmdit.MMDiTConfig.from_dict(json.loads((DATA / "mmdit_sd35.json").read_text())[
        "config"])
    params = jax.eval_shape(mmdit.SD3Transformer2DModel(config).init_params,
                            jax.random.PRNGKey(0))
    found = lora.target_layers(params, ("to_q", "to_out_0", "add_q_proj", "to_add_out"))
    names = sorted("/".join(path) for path in found)
    assert names == sorted(
        [f"transformer_blocks_{i}/attn/{n}" for i in range(3) for n in ("to_q", "to_out_0",
                                                                        "add_q_proj")]
        + [f"transformer_blocks_{i}/attn/to_add_out" for i in range(2)]  # not the last block
        + ["transformer_blocks_0/attn2/to_q", "transformer_blocks_0/attn2/to_out_0"])


def test_a_checkpoint_saved_by_diffusers_loads_with_its_outputs(tmp_path):
    """An SD 3.5-shaped transformer saved by diffusers' own ``save_pretrained`` (PyTorch, the
    interop extra) loads with the same velocity, in float32 and from its fp16 variant."""
    torch = pytest.importorskip("torch")
    torch_diffusers = pytest.importorskip("diffusers")

    record = json.loads((DATA / "mmdit_sd35.json").read_text())
    config = {k: v for k, v in record["config"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = torch_diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # non-zero values also where diffusers initialises zeros
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "fp32")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, config["in_channels"], 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 5, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, config["pooled_projection_dim"])).astype(np.float32)
    timesteps = np.array([500.5, 3.25], np.float32)
    with torch.no_grad():
        want = model(hidden_states=torch.from_numpy(sample),
                     encoder_hidden_states=torch.from_numpy(context),
                     pooled_projections=torch.from_numpy(pooled),
                     timestep=torch.from_numpy(timesteps)).sample.numpy()
    model.half().save_pretrained(tmp_path / "fp16", variant="fp16")  # after the reference
    for directory, variant, tol in ((tmp_path / "fp32", "", 1e-4),
                                    (tmp_path / "fp16", "fp16", 3e-2)):
        module, params = weights_lib.load_sd3_transformer(directory, variant=variant)
        got = jax.jit(module.apply)({"params": params}, sample, context, pooled, timesteps)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol * scale)


def test_lora_export_loads_in_diffusers_sd3_transformer(tmp_path):
    """Our LoRA file of an MMDiT (both streams' projections, alpha != rank) is read by
    diffusers' ``SD3Transformer2DModel.load_lora_adapter`` under the ``transformer`` prefix
    (what ``StableDiffusion3Pipeline.load_lora_weights`` passes), and the PyTorch model then
    computes our velocity. Needs the ``interop`` extra (torch, peft)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    torch_diffusers = pytest.importorskip("diffusers")
    from vard_jax.models import diffusers_export

    record, arrays = _case("mmdit_sd35", tmp_path / "base")
    module, params = weights_lib.load_sd3_transformer(tmp_path / "base")
    targets = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",
               "to_add_out")
    spec = lora.LoraSpec(rank=2, alpha=3.0, targets=targets)
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map(  # B = 0 at init: random values everywhere instead
        lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32),
        lora.init(params, spec, jax.random.PRNGKey(0)))
    assert diffusers_export.denoiser_name(adapters) == "transformer"
    inputs = _inputs(arrays, "square")
    apply = lambda p, *a: module.apply({"params": p}, *a)  # noqa: E731
    ours = np.asarray(jax.jit(lora.apply_unmerged(apply, adapters, spec.scale))(params, *inputs))
    assert np.abs(ours - np.asarray(apply(params, *inputs))).max() > 1e-2  # the adapters matter
    path = diffusers_export.save_diffusers_lora(adapters, spec.scale, tmp_path / "lora",
                                                prefix="transformer")
    model = torch_diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "base").eval()
    model.load_lora_adapter(str(path.parent), prefix="transformer", weight_name=path.name)
    hidden, context, pooled, timestep = (torch.from_numpy(np.asarray(a)) for a in inputs)
    with torch.no_grad():
        theirs = model(hidden_states=hidden, encoder_hidden_states=context,
                       pooled_projections=pooled, timestep=timestep).sample.numpy()
    _close(theirs, ours, 1e-3)
