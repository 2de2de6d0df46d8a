"""The code's shape: imports run one way, no import cycles between files, no process-wide hooks.

Parses every module of the project (nothing is imported) and checks each import of one of our
modules against the layer order below.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

OURS = ("archs", "ssm", "diffusion", "sweeps", "hydra_plugins")
# Lower layers never import higher ones. Same-rank packages may not import each other.
RANKS = [
    ("archs", 0),
    ("ssm", 1), ("diffusion", 1),
    ("sweeps", 2),  # the package __init__ (registers the mixers)
    ("sweeps.config", 3),
    ("sweeps.engine", 4),
    ("sweeps.analysis", 5),
    ("sweeps.grid", 6), ("sweeps.tools", 6),
    ("sweeps.cli", 7),
    ("sweeps.fit", 8), ("sweeps.run", 8), ("sweeps.report", 8), ("sweeps.bench", 8), ("sweeps.sample", 8),
    ("sweeps.sample_tradeoff", 8), ("sweeps.bench_kernels", 8), ("sweeps.bench_layers", 8), ("sweeps.prepare", 8),
    ("sweeps.bench_data", 8),
    ("hydra_plugins", 9),
]
# Imports inside a function are allowed only here: Hydra scans its plugins at the start of every
# Hydra app, and the lab (JAX) should load only when a sweep runs.
DEFERRED_OK = {"hydra_plugins.isoflop_sweeper.isoflop_sweeper"}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for top in OURS:
        for p in (root / top).rglob("*.py"):
            out[_module_name(p, root)] = p
    return out


def _layer(mod: str) -> tuple[str, int]:
    best = max((name for name, _ in RANKS if mod == name or mod.startswith(name + ".")), key=len)
    return best, dict(RANKS)[best]


def _imports(mod: str, path: Path, modules: dict[str, Path]):
    """(imported module, line, at module level?) for each import of one of our modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in OURS:
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                yield name, node.lineno, id(node) in top_level


def problems(root: Path = ROOT) -> list[str]:
    """Every import against the layer order, function-level imports, and import cycles."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    bad = []
    for mod, path in modules.items():
        src_layer, src_rank = _layer(mod)
        for target, line, top in _imports(mod, path, modules):
            if target == mod:
                continue
            graph[mod].add(target)
            if not top and mod not in DEFERRED_OK:
                bad.append(f"{mod}:{line} imports {target} inside a function")
            dst_layer, dst_rank = _layer(target)
            if dst_layer == src_layer or src_layer.startswith(dst_layer + ".") or target == src_layer:
                continue  # within one package, or a package's own __init__
            if dst_rank >= src_rank:
                bad.append(f"{mod}:{line} ({src_layer}, rank {src_rank}) imports {target} ({dst_layer}, rank {dst_rank})")
    # No cycles between files: depth-first search for a back edge.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                bad.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return bad


def test_imports_follow_the_layer_order_and_have_no_cycles():
    found = problems()
    assert not found, "\n".join(found)


def test_the_checker_reports_each_kind_of_violation(tmp_path):
    files = {
        "archs/__init__.py": "",
        "archs/model.py": "from sweeps.engine import loop\n",  # up the order
        "ssm/__init__.py": "from diffusion import objective\n",  # sideways
        "diffusion/__init__.py": "",
        "diffusion/objective.py": "def f():\n    import archs.model\n",  # deferred
        "sweeps/__init__.py": "",
        "sweeps/engine/__init__.py": "",
        "sweeps/engine/loop.py": "from sweeps.engine import data\n",
        "sweeps/engine/data.py": "from . import loop\n",  # a cycle between two files of one package
        "hydra_plugins/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = "\n".join(problems(tmp_path))
    assert "archs.model:1 (archs, rank 0) imports sweeps.engine.loop" in found
    assert "ssm:1 (ssm, rank 1) imports diffusion.objective" in found
    assert "diffusion.objective:2 imports archs.model inside a function" in found
    assert "import cycle: sweeps.engine.loop -> sweeps.engine.data -> sweeps.engine.loop" in found
    assert len(found.splitlines()) == 4, found


def test_no_process_wide_hooks_are_replaced():
    hooks = ("sys.excepthook", "threading.excepthook", "sys.unraisablehook")
    found = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if ast.unparse(el) in hooks:
                            found.append(f"{mod}:{node.lineno} assigns {ast.unparse(el)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("setLevel", "disable")):
                found.append(f"{mod}:{node.lineno} changes a logger: {ast.unparse(node)}")
    assert not found, "\n".join(found)
