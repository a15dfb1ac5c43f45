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
EVAL_USES = {
    "generators",
    "generators.images",
    "generators.datasets",
    "generators.phantom",
    "generators.phantom_render",
}
#: issue 12's limits: a file of at most 500 lines, a function of at most 80, in the packages
#: and in benchmarks/ (everything outside tests)
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80
SIZED = (*PACKAGES, "benchmarks")


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
    assert circles(graph()) == []


def sizes(root: Path = ROOT, dirs: tuple[str, ...] = SIZED) -> tuple[dict, dict]:
    """Lines of every file over MAX_FILE_LINES and every function over MAX_FUNCTION_LINES."""
    files, functions = {}, {}
    for path in sorted(p for d in dirs for p in (root / d).rglob("*.py")):
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            files[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    functions[f"{rel}:{node.name}"] = lines
    return files, functions


def test_no_long_files_or_functions():
    files, functions = sizes()
    found = {**files, **functions}
    assert not found, "split these by job (docs/architecture.md):\n" + "\n".join(
        f"{name}: {n} lines" for name, n in sorted(found.items())
    )


def test_the_checks_catch_what_they_look_for(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg" / "long.py").write_text(f"def f():\n{body}\n" + "\n" * MAX_FILE_LINES)
    (tmp_path / "pkg" / "short.py").write_text("def g():\n    return 1\n")
    files, functions = sizes(tmp_path, ("pkg",))
    assert files == {"pkg/long.py": MAX_FUNCTION_LINES + 1 + MAX_FILE_LINES}
    assert functions == {"pkg/long.py:f": MAX_FUNCTION_LINES + 1}
    g = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b.q": {"a.x"}}
    assert circles(g) == [{"a.x", "a.y", "a.z"}]
    assert "generators.model" in imports(ROOT / "rl" / "samplers.py")  # inside a function
