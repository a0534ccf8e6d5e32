"""The package is a stack of layers (docs/architecture.md): every import, at module level or inside a
function, points to a lower layer; siblings in one package may import each other, never in a cycle;
a backend package's parts never import the package itself, nor another framework's package; and
only the backends and the framework wrappers import a framework. Read with ``ast`` from the files."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xseqloss")

# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS = {
    "xseqloss._errors": 0,
    "xseqloss.plan": 1,
    "xseqloss.core": 2,
    "xseqloss.backends": 3,
    "xseqloss._dispatch": 4,
    "xseqloss.api": 5,
    "xseqloss._class_parallel": 6,
    "xseqloss.loss": 7, "xseqloss.linear": 7, "xseqloss.pool": 7, "xseqloss.stats": 7,
    "xseqloss.distributed": 8,
    "xseqloss.torch": 9, "xseqloss.keras": 9, "xseqloss.hf": 9, "xseqloss.presets": 9,
    "xseqloss.internals": 9, "xseqloss._quiet": 9,
    "xseqloss": 10,
    "xseqloss.cli": 11, "xseqloss.__main__": 11,  # the command line uses the public namespace
}
FRAMEWORKS = ("torch", "tensorflow", "jax", "jaxlib", "keras", "triton", "transformers", "flax")
# the edge modules allowed to import a framework (besides the backend packages)
FRAMEWORK_EDGES = {"xseqloss.torch": {"torch"}, "xseqloss.keras": {"keras"}, "xseqloss.hf": {"torch", "transformers"},
                   "xseqloss._quiet": {"tensorflow"}}  # imports TensorFlow with its start-up lines hidden


def modules(root: str = ROOT) -> dict[str, str]:
    base = os.path.dirname(root)
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                name = os.path.relpath(p, base)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def imports(name: str, path: str, mods: dict[str, str]) -> tuple[set[str], set[str]]:
    """(the package's modules ``name`` imports, the top-level external packages it imports)."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found, external = set(), set()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "xseqloss":
                    t = resolve(a.name)
                    if t:
                        found.add(t)
                else:
                    external.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
                if base.split(".")[0] != "xseqloss":
                    external.add(base.split(".")[0])
                    continue
            for a in node.names:
                full = f"{base}.{a.name}"
                t = full if full in mods else resolve(base)
                if t:
                    found.add(t)
    found.discard(name)
    return found, external


def layer_of(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def framework_of(name: str) -> str | None:
    """The backend package a module belongs to (``xseqloss.backends.torch.fused`` -> "torch")."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "backends" and not parts[2].startswith("_") else None


def violations(mods: dict[str, str]) -> list[str]:
    bad = []
    graph = {}
    for name, path in mods.items():
        deps, external = imports(name, path, mods)
        graph[name] = deps
        for d in deps:
            lo, ld = layer_of(name), layer_of(d)
            if ld > lo:
                bad.append(f"{name} (layer {lo}) imports {d} (layer {ld}): upward")
            elif ld == lo and d.rpartition(".")[0] != name.rpartition(".")[0] and not (
                    # a package composes its own parts (its __init__ imports its children) ...
                    d.startswith(name + ".")
                    # ... and a backend part may import the backends' shared part (backends._array_api)
                    or (name.startswith("xseqloss.backends.") and d.startswith("xseqloss.backends._"))):
                bad.append(f"{name} imports {d}: the same layer ({lo}) outside its own package")
            fw = framework_of(name)
            if fw and d == f"xseqloss.backends.{fw}" and name != d:
                bad.append(f"{name} imports its own backend package's __init__ (the parts never do)")
            if fw and framework_of(d) not in (None, fw):
                bad.append(f"{name} imports another framework's backend ({d})")
        if not name.startswith("xseqloss.backends"):
            allowed = FRAMEWORK_EDGES.get(name, set())
            for ext in external & set(FRAMEWORKS):
                if ext not in allowed:
                    bad.append(f"{name} imports the framework {ext!r}: framework code lives under backends/")
    bad += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen, stack, on, out = set(), [], set(), []

    def visit(v: str) -> None:
        seen.add(v)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w in on:
                out.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w)
        stack.pop()
        on.discard(v)

    for v in sorted(graph):
        if v not in seen:
            visit(v)
    return out


def test_every_import_points_down():
    mods = modules()
    assert len(mods) > 40
    bad = violations(mods)
    assert not bad, "\n".join(bad)


def test_no_module_is_too_long():
    """Files that fit in a head: no module over 450 lines (split a module along its own sections)."""
    long = {n: sum(1 for _ in open(p)) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > 450}, sorted(long.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("planted, expect", [
    ("xseqloss/core/token_loss.py", "upward"),                    # the core importing a backend's part
    ("xseqloss/backends/torch/fused.py", "own backend package"),  # a part importing its package
    ("xseqloss/_class_parallel.py", "framework"),                 # orchestration importing torch.distributed
])
def test_the_check_fails_on_a_planted_import(tmp_path, planted, expect):
    """The check is not vacuous: one bad import put back into a copy of the package is found."""
    import shutil
    copy = tmp_path / "xseqloss"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    line = {"upward": "from ..backends.torch import fused\n",
            "own backend package": "from .. import torch as _package\n",
            "framework": "import torch.distributed\n"}[expect]
    target = copy / os.path.relpath(os.path.join(os.path.dirname(ROOT), planted), os.path.dirname(ROOT)).split("/", 1)[1]
    target.write_text(target.read_text() + "\n\ndef _planted():\n    " + line)
    bad = violations(modules(str(copy)))
    assert any(expect in b for b in bad), bad


def test_every_package_ships():
    """Each package directory of xseqloss is listed in pyproject.toml (a plain install has it)."""
    import re
    text = open(os.path.join(os.path.dirname(ROOT), "pyproject.toml")).read()
    listed = set(re.findall(r'"(xseqloss[\w.]*)"', text[text.index("packages = ["):text.index("package-dir")]))
    found = {name for name, path in modules().items() if path.endswith("__init__.py")}
    assert found <= listed, sorted(found - listed)
