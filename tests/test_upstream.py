"""The upstream layer filters the libraries' Flax deprecation notice, and nothing else."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

from vard_jax import upstream

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _package_dir(name: str) -> pathlib.Path:
    return pathlib.Path(importlib.util.find_spec(name).origin).parent


def test_every_installed_module_that_logs_the_notice_is_filtered():
    emitting = set()
    for package in ("diffusers", "transformers"):
        root = _package_dir(package)
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="ignore")
            if any(marker in text for marker in upstream._DEPRECATION_MARKERS):
                module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                emitting.add(module)
    assert emitting, "no module logs the notice: the markers no longer match the libraries"
    assert emitting == set(upstream.EMITTING_MODULES)


_SCRIPT = """
import logging, sys
logging.basicConfig(stream=sys.stderr, format="ROOT %(message)s")  # a root handler, as absl's
from vard_jax import upstream
transformers = upstream.transformers()
diffusers = upstream.diffusers()
config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=8)
transformers.FlaxCLIPTextModel(config, input_shape=(1, 8))
diffusers.FlaxDDIMScheduler(num_train_timesteps=10).create_state()
logging.getLogger("transformers.modeling_flax_utils").warning("another message")
"""


def test_the_notice_is_dropped_even_where_transformers_propagates_to_the_root_logger():
    # transformers lets its records propagate to the root logger when CI is set.
    env = {"CI": "true", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(_ROOT),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr, result.stderr
    # Other messages still come through, once from the library's handler and once from root.
    assert result.stderr.count("another message") == 2, result.stderr
