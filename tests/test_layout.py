"""The package layout DESIGN.md asks for: no import cycle among the layers of mamba_jax.nn."""

import ast
import pathlib

import mamba_jax

NN = pathlib.Path(mamba_jax.__file__).parent / "nn"


def _nn_imports(path: pathlib.Path) -> set[str]:
    """The mamba_jax.nn modules that ``path`` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mamba_jax.nn."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mamba_jax.nn.")}
    return found


def test_nn_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _nn_imports(p) for p in NN.glob("*.py") if p.stem != "__init__"}
    # the leaves every layer may use: the initialisers' own module and the shared causal convolution
    assert graph["init"] == set() and graph["conv"] <= {"init"}, graph
    assert graph["attention"] <= {"init", "conv"} and graph["mlp"] <= {"init"}, graph
    visiting, done = set(), set()

    def visit(module, trail):
        assert module not in visiting, f"import cycle: {' -> '.join(trail + [module])}"
        if module in done:
            return
        visiting.add(module)
        for dep in graph.get(module, ()):
            visit(dep, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
