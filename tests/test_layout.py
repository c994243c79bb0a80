"""The tree's promises: stages depend on the store and the core only, the store is the cache only, the
core is the ground floor (no stage, no demo above it), no module takes part in an import cycle (at
module level or inside a function), and no function or class in the stages and store outgrows a screen."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("litpipe.precompute", "litpipe.train_text", "litpipe.eval", "litpipe.serve")
ROOF = ("litpipe.cli", "litpipe.__main__", "litpipe.run", "litpipe.demo", "litpipe.sweep")  # what sits on top of every stage
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 300
CORE_FOR_THE_STORE = ("litpipe", "litpipe.config", "litpipe.errors", "litpipe.files", "litpipe.prefetch", "litpipe.progress",
                      "litpipe.skips")


def modules() -> dict[str, Path]:
    """Every module of the distribution, named as installed (pyproject's package-dir mapping)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in mapping.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if not any(name.startswith(p + ".") for p in mapping if p != package and p.startswith(package + ".")):
                found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The litpipe modules `name` imports anywhere in its file (a package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_no_module_is_part_of_an_import_cycle():
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_stages_never_import_each_other():
    for module, targets in GRAPH.items():
        own = next((s for s in STAGES if module == s or module.startswith(s + ".")), None)
        if own:
            others = [t for t in targets for s in STAGES if s != own and (t == s or t.startswith(s + "."))]
            assert not others, f"{module} imports another stage: {others}"


def test_the_store_is_the_cache_contract_alone():
    for module, targets in GRAPH.items():
        if module.startswith("litpipe.store"):
            outside = sorted(t for t in targets if not t.startswith("litpipe.store") and t not in CORE_FOR_THE_STORE)
            assert not outside, f"{module} reaches outside the cache contract: {outside}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(GRAPH)
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(len(names))


def _room(module: str) -> str:
    """The room a module lives in: a stage, the store, the roof, or the core."""
    for room in (*STAGES, "litpipe.store", *ROOF):
        if module == room or module.startswith(room + "."):
            return room
    return "core"


def test_the_core_is_the_ground_floor_it_imports_no_stage_and_no_demo():
    for module, targets in GRAPH.items():
        if _room(module) == "core":
            above = sorted(t for t in targets if _room(t) in (*STAGES, *ROOF))
            assert not above, f"{module} (the core) imports what is built on it: {above}"


def test_no_function_over_60_lines_and_no_class_over_300_in_the_stages_and_store():
    long = []
    for module, path in modules().items():
        if _room(module) not in (*STAGES, "litpipe.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{module}.{node.name}: {lines} lines (at most {limit})")
    assert not long, "split these: " + "; ".join(long)
