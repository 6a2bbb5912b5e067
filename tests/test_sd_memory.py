"""experiments/sd_memory.py in its smoke mode (a two-block tiny UNet, T = 2), in-process.

Compiling a policy step takes most of a minute on a small CPU even for the tiny UNet, so the
policy steps are only traced and lowered here (the exact step functions, abstract inputs),
and the value step is compiled for the XLA memory figures.
"""

import json

import pytest

from experiments import sd_memory


@pytest.mark.slow  # an experiment script end to end, as the others
def test_smoke_policy_sizes_and_value_memory(tmp_path):
    out = tmp_path / "policy.json"
    report = sd_memory.main(["--smoke", "--lower_only", f"--out={out}",
                             "--configs=policy-lora-full-K1-T2,policy-full-full-K1-T2"])
    assert json.loads(out.read_text()) == report
    rows = {row["name"]: row for row in report["results"]}
    lora, full = rows["policy-lora-full-K1-T2"], rows["policy-full-full-K1-T2"]
    # Full fine-tuning trains every UNet parameter (a float32 copy of the bf16 reference);
    # LoRA rank 8 on the attention projections trains a small fraction of them.
    assert full["trainable_params"] == full["reference_params"]
    assert full["trainable_bytes"] == 2 * full["reference_bytes"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    # Adam keeps two float32 moments per trainable parameter.
    assert lora["opt_state_bytes"] >= 2 * lora["trainable_bytes"]
    assert lora["opt_state_bytes"] < full["opt_state_bytes"] / 10

    value = sd_memory.main(["--smoke", "--fast_compile", "--configs=value-b8"])["results"][0]
    memory = value["memory"]
    assert memory["temp_size_in_bytes"] > 0
    # The arguments hold at least the whole train state (donated, hence aliased).
    assert memory["argument_size_in_bytes"] >= value["state_bytes"]
    assert value["peak_bytes"] > memory["argument_size_in_bytes"]
    assert value["flops"] > 0


@pytest.mark.slow  # traces the 2.5 B-parameter MMDiT (abstract: no weights, no compile)
def test_sd35_medium_sizes():
    report = sd_memory.main(["--model=sd35", "--lower_only",
                             "--configs=policy-lora-full-K1-T2"])
    row = report["results"][0]
    assert report["unet"].startswith("Stable Diffusion 3.5 Medium")
    # 2.47 B parameters with the 384 x 384 position table; LoRA rank 32 on the attention
    # projections of both streams (configs/sd35_pickscore.py).
    assert 2.4e9 < row["reference_params"] < 2.5e9
    assert row["trainable_params"] == 23_887_872


def test_sd35_smoke_measures_a_tiny_mmdit():
    # --smoke with --model=sd35 measures a tiny MMDiT, not the SD 1.5 smoke UNet.
    report = sd_memory.main(["--model=sd35", "--smoke", "--lower_only",
                             "--configs=policy-lora-full-K1-T2"])
    row = report["results"][0]
    assert report["unet"] == "smoke (2-layer tiny MMDiT)"
    assert report["unet_config"]["dual_attention_layers"] == [0]
    assert 0 < row["trainable_params"] < row["reference_params"] < 1e6
