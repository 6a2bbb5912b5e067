"""experiments/colab_tpu.ipynb runs top to bottom on CPU with its tiny config (a Jupyter kernel
on this interpreter; the parameters are overridden by a cell inserted after the tagged one)."""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"


def _with_parameters(notebook, **values):
    """Inserts an assignment cell after the cell tagged "parameters" (as papermill does)."""
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


def _outputs(cell, kind):
    return [out for out in cell.get("outputs", []) if kind in out.get("data", {})]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("colab")
    notebook = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY=True,
                                WORKDIR=str(workdir))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook, workdir


def test_notebook_trains_plots_and_samples_from_the_restored_checkpoint(executed):
    notebook, workdir = executed
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    text = "".join(out.get("text", "") for cell in code for out in cell.get("outputs", []))
    assert "backend cpu: 1 devices" in text
    assert "restored step 2" in text
    images = [cell for cell in code if _outputs(cell, "image/png")]
    assert len(images) == 3  # reward curve, last evaluation grid, samples of the restored policy
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (workdir / "samples" / "step_00002.png").is_file()
    assert (workdir / "restored_samples.png").is_file()


def test_notebook_parameters_cell_defaults_to_the_pickscore_config():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    source = parameters[0].source
    assert 'CONFIG = "configs/pickscore.py"' in source and "TINY = False" in source
    assert 'REPO_URL = ""' in source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
