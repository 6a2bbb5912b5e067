"""The package's imports run one way: each layer imports only the layers below it.

Read from the source (every ``import`` statement, also those inside functions; those under
``if TYPE_CHECKING:`` are not run and are not counted), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vard_jax"

# Lowest first. A module may import its own package (``vard_jax.<name>``) and anything in a
# lower layer; packages in one layer are independent of each other.
LAYERS = (
    ("tokenizer",),  # CLIP's BPE tokenizer
    ("diffusion", "worlds"),  # sampling maths; the shapes world's scenes and tokenizer
    ("prompts",),
    ("models",),
    ("rewards",),
    ("schema",),
    ("config",),  # validation of a run's config (reads the reward registry)
    ("algorithms", "parallel"),
    ("training",),
    ("cli",),
    ("main", "evaluate", "sample", "export"),  # entry points: thin CLIs, independent
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """{module: the vard_jax modules it imports}, by full module name."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # ``from package import module`` imports the module; ``from module import
                # name`` the module.
                candidates = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules
                              else origin for alias in node.names]
            else:
                continue
            for target in candidates:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer_of(module: str) -> tuple[int, str]:
    """(layer index, top-level name) of a ``vard_jax.<top>...`` module."""
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index, top
    raise AssertionError(f"{module}: not in test_layout.LAYERS; give its package a layer")


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    upward = []
    for module, targets in sorted(import_graph().items()):
        if module == "vard_jax":
            continue
        layer, top = _layer_of(module)
        for target in sorted(targets):
            if target == "vard_jax":
                upward.append(f"{module} -> {target} (the package root)")
                continue
            target_layer, target_top = _layer_of(target)
            if target_top != top and target_layer >= layer:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("from vard_jax.training import trainer\n", {"vard_jax.training.trainer"}),
    ("def f():\n    from vard_jax.models.loader import load\n", {"vard_jax.models.loader"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vard_jax.training\n",
     set()),
])
def test_the_graph_reads_lazy_imports_and_skips_type_checking_ones(tmp_path, monkeypatch,
                                                                   source, expected):
    package = tmp_path / "vard_jax"
    for sub in ("training", "models"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "training" / "trainer.py").write_text("")
    (package / "models" / "loader.py").write_text("")
    (package / "probe.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert import_graph()["vard_jax.probe"] == expected
