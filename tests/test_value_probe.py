"""experiments/value_probe.py end to end on the tiny config, and its input errors."""

import json

import numpy as np
import pytest

from tests.test_entry_points import last_json_line, run_module


@pytest.mark.slow  # an experiment script end to end: its own compiles (run with -m slow)
def test_value_probe_reports_fits_on_held_out_chains(tmp_path):
    out = tmp_path / "probe.json"
    result = run_module("experiments.value_probe",
                        "--config=configs/shapes.py:tiny", "--chains=8,4",
                        "--held_out=4", "--updates=3,1", "--grad_alignment", f"--out={out}")
    assert result.returncode == 0, result.stderr
    probe = last_json_line(result.stdout)
    assert json.loads(out.read_text()) == probe
    assert probe["reward"] == "clip_alignment" and probe["held_out_chains"] == 4
    assert probe["reward_std"] > 0.0
    assert [fit["chains"] for fit in probe["fits"]] == [4, 8]  # sorted
    for fit in probe["fits"]:
        assert [p["updates"] for p in fit["points"]] == [1, 3]
        for point in fit["points"]:
            values = [point["fit_explained_variance"], point["held_out_explained_variance"],
                      *point["held_out_by_quarter"]]
            assert len(point["held_out_by_quarter"]) == 4
            assert np.all(np.isfinite(values))
            cosines = [point["held_out_grad_cosine"], *point["held_out_grad_cosine_by_quarter"],
                       point["held_out_grad_cosine_positive"]]
            assert len(cosines) == 6 and np.all(np.abs(cosines) <= 1.0), cosines
            assert point["held_out_grad_cosine"] != 0.0  # V's head has left its zero start
        # Three more updates on the same chains change the fit.
        first, last = fit["points"]
        assert first["fit_explained_variance"] != last["fit_explained_variance"]


def test_value_probe_input_errors_are_one_line():
    for args, message in ((["--chains=a,b"], "--chains='a,b': expected comma-separated"),
                          (["--updates=0"], "--updates='0': expected positive integers"),
                          (["--held_out=1"], "--held_out=1: needs at least 2 chains"),
                          (["--grad_alignment"], "--grad_alignment: reward 'jpeg_compressibility' "
                                                 "is not differentiable")):
        result = run_module("experiments.value_probe",
                            "--config=configs/shapes_compressibility.py:tiny", *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
