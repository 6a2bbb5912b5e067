"""An installed wheel (not an editable install) works from any directory: the configuration
schema and the shipped model come from the package, the config files from wherever the user
keeps them.

The wheel is built from a copy of the sources the package needs (pyproject.toml, README.md,
vard_jax/), so the build leaves nothing in the repository, and installed with ``--target`` into
a directory that comes first on ``PYTHONPATH`` (the dependencies are this interpreter's). The
commands run in another directory, with the repository's configs copied elsewhere.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "vard_jax", source / "vard_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                  str(root / "dist"), str(source)], root, env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("vard_jax-*.whl")
    site = root / "site"
    done = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                 str(site), str(wheel)], root, env)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = root / "elsewhere"
    shutil.copytree(REPO / "configs", elsewhere / "my_experiments" / "configs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(site)
    return wheel, site, elsewhere, env


def test_the_wheel_holds_the_package_schema_and_model_not_the_repository(installed):
    wheel, *_ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "vard_jax/schema.py" in names and "vard_jax/main.py" in names
    assert any(n.startswith("vard_jax/assets/shapes/") for n in names)
    assert not any(n.startswith(("configs/", "tests/", "experiments/")) for n in names)


def test_installed_package_runs_from_another_directory(installed):
    _, site, elsewhere, env = installed
    check = _run([sys.executable, "-c",
                  "import vard_jax, vard_jax.schema\n"
                  "from vard_jax.models import shapes\n"
                  "shapes.load()\n"  # the shipped model, from the package's data
                  "print(vard_jax.__file__)"], elsewhere, env)
    assert check.returncode == 0, check.stderr[-3000:]
    assert pathlib.Path(check.stdout.strip()).is_relative_to(site)
    # A config file kept elsewhere, importing a sibling (configs/shapes_fidelity.py imports
    # configs/shapes.py), loads and validates against the installed schema: the run stops
    # at the one field it was given wrong, not at an import.
    config = elsewhere / "my_experiments" / "configs" / "shapes_fidelity.py"
    result = _run([sys.executable, "-m", "vard_jax.main", f"--config={config}:tiny",
                   f"--workdir={elsewhere / 'run'}", "--config.train.epochs=0"], elsewhere, env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.train.epochs = 0: not allowed; must be an integer >= 1"), result.stderr


@pytest.mark.slow
def test_installed_package_trains_from_another_directory(installed):
    _, _, elsewhere, env = installed
    config = elsewhere / "my_experiments" / "configs" / "shapes.py"
    result = _run([sys.executable, "-m", "vard_jax.main", f"--config={config}:tiny",
                   f"--workdir={elsewhere / 'run'}", "--config.train.epochs=1",
                   "--config.reward.eval_extra="], elsewhere, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints" / "1").is_dir()
