"""experiments/benchmark.py in its smoke mode (a tiny random UNet, T = 2, batch 2, one repeat),
in-process: the JSON has every section with positive figures. No timing thresholds.

PyTorch is optional (the ``bench`` extra): without it the benchmark reports the JAX figures
alone and says so, and this test checks that instead of the PyTorch figures.
"""

import json

import pytest

from experiments import benchmark


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow  # an experiment script end to end (a minute on 2 cores), as the others
def test_smoke_unet_and_sampling_sections(tmp_path):
    """The quick part of the smoke mode: UNet calls and sampling."""
    report = benchmark.main(["--smoke", "--sections=unet,sample", f"--out={tmp_path / 'b.json'}"])
    assert report["smoke"] and report["batch"] == 2 and report["steps"] == 2
    for name in ("jax_forward", "jax_forward_backward"):
        assert _positive(report["unet"][name]["median_s"])
    assert _positive(report["sample"]["compile_s"])
    assert _positive(report["sample"]["jax_images_per_s"])
    assert "policy" not in report and "memory" not in report
    if report["torch"]["available"]:
        assert report["unet"]["torch_max_abs_diff"] < 1e-3 * max(
            1.0, report["unet"]["output_max_abs"])


@pytest.mark.slow  # every section: several compiles of the policy step (minutes on 2 cores)
def test_smoke_json_structure(tmp_path):
    out = tmp_path / "bench.json"
    report = benchmark.main(["--smoke", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=float))

    assert report["smoke"] and report["batch"] == 2 and report["steps"] == 2
    env = report["environment"]
    assert len(env["loadavg_start"]) == 3 and len(env["loadavg_end"]) == 3
    assert env["jax"]["version"] and env["machine"]["cpu_count"] >= 1
    assert "XLA_FLAGS" in env["threads"]

    unet = report["unet"]
    for name in ("jax_forward", "jax_forward_backward"):
        assert _positive(unet[name]["median_s"])
    sample = report["sample"]
    assert _positive(sample["compile_s"]) and _positive(sample["jax_images_per_s"])
    for name in ("value", "policy"):
        assert _positive(report[name]["compile_s"])
        assert _positive(report[name]["jax"]["median_s"])
    assert _positive(report["policy"]["memory"]["peak_mib"])

    epoch = report["epoch"]
    assert _positive(epoch["median_s"]) and _positive(epoch["floor_s"])
    assert _positive(epoch["overhead"])
    assert epoch["unet_calls"] == {"forward_2B": 4, "forward_backward_2B": 2}

    memory = report["memory"]
    assert memory["scan_unroll"] == 1
    rows = memory["rows"]
    assert {(r["steps"], r["grad_depth"], r["remat"]) for r in rows} == {
        (2, 1, "none"), (2, 1, "full")}
    assert all(_positive(r["peak_mib"]) and _positive(r["temp_size_in_bytes"]) for r in rows)

    if report["torch"]["available"]:
        # The twin is the same model: the UNet's and the value model's outputs agree.
        assert unet["torch_max_abs_diff"] < 1e-3 * max(1.0, unet["output_max_abs"])
        assert report["value"]["torch_max_abs_diff"] < 1e-3
        for name in ("ratio_forward", "ratio_forward_backward"):
            assert _positive(unet[name])
        for name in ("sample", "value", "policy"):
            assert _positive(report[name]["torch"]["median_s"])
            assert _positive(report[name]["ratio"])
    else:
        assert report["torch"]["reason"]


@pytest.mark.slow  # bfloat16 compiles of the policy step on CPU (about 3 minutes on 2 cores)
def test_sd15_mode_on_a_tiny_sd_shaped_model(tmp_path, monkeypatch):
    """``--model=sd15`` is meant for GPU sessions; its code path (random CLIP text encoder,
    SD-1.5 block layout, bfloat16, remat full, the PyTorch twin under autocast, no epoch)
    runs here on an SD-shaped UNet and text encoder shrunk to test size."""
    monkeypatch.setattr(benchmark, "SD15_UNET", dict(
        benchmark.SD15_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64),
        layers_per_block=1, attention_head_dim=4, cross_attention_dim=32))
    monkeypatch.setattr(benchmark, "SD15_TEXT", dict(
        benchmark.SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4))
    monkeypatch.setattr(benchmark, "SD15_LATENT", (4, 16, 16))
    report = benchmark.main(["--model=sd15", "--batch=2", "--steps=2", "--repeats=1",
                             "--sections=unet,sample,value,policy,epoch",
                             f"--out={tmp_path / 'sd15.json'}"])
    assert report["model"] == "sd15" and report["config"]["dtype"] == "bfloat16"
    assert report["config"]["remat"] == "full"
    assert report["epoch"] == {"skipped": "the sd15 benchmark model has no VAE and no reward"}
    assert _positive(report["policy"]["jax"]["median_s"])
    assert _positive(report["policy"]["memory"]["peak_mib"])
    assert _positive(report["sample"]["jax_images_per_s"])
    if report["torch"]["available"]:
        # bfloat16 on both sides: agreement to bfloat16's resolution.
        assert report["unet"]["torch_max_abs_diff"] < 0.05 * max(
            1.0, report["unet"]["output_max_abs"])
        for name in ("sample", "value", "policy"):
            assert _positive(report[name]["ratio"])
