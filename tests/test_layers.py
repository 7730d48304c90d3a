"""The package's layers: imports only ever point down, and no module imports itself back.

Read from the source (every ``import``, also inside functions), so a lazy import that would
close a circle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import scaleinv

PACKAGE = Path(scaleinv.__file__).parent

# Bottom to top; a module may import its own layer and the ones below it.
LAYERS: list[set[str]] = [
    {"_constants", "distributed"},
    {"projection"},
    {"_amp", "_cbuild", "_layout", "_fused_cpu", "_fused_triton", "_fused_compiled", "backends",
     "_ops", "fused"},
    {"_common", "adamp", "sgdp", "integrations"},
    {"wrap", "inspect", "monitor", "plots", "optax"},
    {"experiments"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """The ``scaleinv`` modules ``path`` imports, as dotted names below the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("scaleinv."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "scaleinv":
                found.update(f"scaleinv.{a.name}" for a in node.names)
            elif node.module.startswith("scaleinv."):
                found.add(node.module)
    return {name.removeprefix("scaleinv.") for name in found}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path):
            # "experiments.data" -> the module if it is one, else its package
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"module {module!r} is in no layer; add it to LAYERS")


def test_imports_point_down() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items() if source != "__init__"
        for target in targets if target != "__init__"
        and layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target] if target in path
                               else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_layers_name_every_module() -> None:
    for module in graph():
        if module != "__init__":
            layer_of(module)


def test_the_jax_port_imports_no_torch_layer() -> None:
    """``scaleinv.optax`` sits beside the torch layers: it imports only its own modules."""
    outside = {
        f"{source} -> {target}"
        for source, targets in graph().items() if source.startswith("optax")
        for target in targets if not target.startswith("optax") and target != "__init__"
    }
    assert not outside, sorted(outside)
