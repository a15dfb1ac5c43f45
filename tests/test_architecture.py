"""docs/architecture.md's rules, checked on every import statement of the packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runfiles", "generators", "rewards", "rl", "eval", "cluster", "medrl")
MAY_IMPORT = {
    "runfiles": set(),
    "generators": {"runfiles"},
    "rewards": {"runfiles", "generators"},
    "rl": {"runfiles", "generators", "rewards", "eval"},
    "eval": {"runfiles", "generators"},
    "cluster": {"runfiles", "generators", "rewards", "rl"},
    "medrl": set(PACKAGES) - {"medrl"},
}
#: eval uses generators' image, dataset and phantom types only
EVAL_USES = {"generators", "generators.images", "generators.datasets", "generators.phantom"}
#: issue 12's redesign removes these; any other circle fails
KNOWN_CIRCLES = [{"rewards.ratings", "rewards.rounds"}]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path``, inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n in imports(f) if n in mods and n != m} for m, f in mods.items()}


def circles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_downwards():
    bad = []
    for mod, path in modules().items():
        pkg = mod.split(".")[0]
        for name in imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != pkg and top not in MAY_IMPORT[pkg]:
                bad.append(f"{path.relative_to(ROOT)}: imports {name}")
            if pkg == "eval" and top == "generators" and name not in EVAL_USES:
                if not any(name.startswith(u + ".") for u in EVAL_USES - {"generators"}):
                    bad.append(f"{path.relative_to(ROOT)}: eval imports {name}")
    assert not bad, "\n".join(bad)


def test_no_new_import_circles():
    found = circles(graph())
    assert sorted(map(sorted, found)) == sorted(map(sorted, KNOWN_CIRCLES))


def test_the_checks_catch_what_they_look_for():
    g = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b.q": {"a.x"}}
    assert circles(g) == [{"a.x", "a.y", "a.z"}]
    assert "generators.model" in imports(ROOT / "rl" / "samplers.py")  # inside a function
