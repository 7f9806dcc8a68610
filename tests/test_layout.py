"""The package layout holds: one import name, layers that point down, no import cycles.

Read from the source with `ast` (every import, including the lazy ones inside functions),
so a back-arrow or a cycle fails here before it can bite at run time."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("launcher", "model", "parallel", "rl", "data_pipeline", "cluster")
# What each layer may import from trellis (launcher, the top, may import everything).
MAY_IMPORT = {
    "model": {"model"},
    "parallel": {"parallel", "model"},
    "data_pipeline": {"data_pipeline", "parallel"},
    "cluster": {"cluster"},
    "rl": {"rl", "model", "parallel", "data_pipeline"},
}
DISTRIBUTED = ("ray", "deepspeed", "torch.distributed")


def _modules() -> dict[str, Path]:
    out = {}
    for part in PARTS:
        for f in (ROOT / part).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            name = ".".join(("trellis", *rel.parts))
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """Every module `name` imports (absolute names), lazy imports included."""
    found = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + [base]).strip(".")
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def test_every_import_uses_the_trellis_namespace():
    bare = {f"{m} imports {i}" for m, deps in GRAPH.items() for i in deps
            if i.split(".")[0] in PARTS}
    assert not bare, sorted(bare)


def test_layers_point_down():
    bad = []
    for mod, deps in GRAPH.items():
        layer = mod.split(".")[1]
        for dep in deps:
            if dep.startswith("trellis.") and layer in MAY_IMPORT:
                if dep.split(".")[1] not in MAY_IMPORT[layer]:
                    bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_model_code_imports_nothing_distributed():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("trellis.model")
           for d in deps if d.split(".")[0] in ("ray", "deepspeed") or d.startswith(DISTRIBUTED[2])]
    assert not bad, bad


def test_no_import_cycles():
    internal = {m: {d for d in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
    cycles, index, low, stack, on = [], {}, {}, [], set()

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in internal[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in internal:
        if v not in index:
            strong(v)
    assert not cycles, cycles


def test_the_checker_sees_a_back_arrow(tmp_path):
    """The scan itself works: a lazy launcher import inside a function is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from trellis.launcher.cli import main\n")
    assert "trellis.launcher.cli" in _imports(f, "trellis.cluster.x")
