"""The package's shape, checked from its source: layers, no import circles, sizes.

Layers, lowest first; a module may import its own layer or a lower one, never a higher:
  config            run configuration (imports nothing of dist_sense but itself)
  comm              launcher variables and every collective (torch.distributed, MPI)
  runtime           array backend, fault points, metrics writers, process settings
  formats, kmeans   files between stages; the k-means and MCL maths
  model, demo       teacher, student, loss, SenseEncoder; the demo's data
  stages            one module or package per stage, each with run(cfg)
  cli               the entry every launcher goes through
Lazy imports inside functions and TYPE_CHECKING imports count like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dist_sense"
LAYERS = {"config": 0, "comm": 1, "runtime": 2, "formats": 3, "kmeans": 3, "model": 4, "demo": 4, "stages": 5,
          "cli": 6, "__init__": 6}
MATHS = ("kmeans",)
FORBIDDEN_IN_MATHS = ("mpi4py", "torch.distributed", "deepspeed", "dist_sense.comm", "dist_sense.stages")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str] = frozenset()) -> set[str]:
    """Absolute names of the modules `path` imports: `from a import b` counts a.b where a.b is one
    of `modules`, else a."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in modules)
            if not all(n in modules for n in names):
                found.add(base)
    return found


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def internal_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: {m for m in imports_of(path, name, set(modules)) if m in modules and m != name}
            for name, path in modules.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None. A package's __init__ importing its own
    submodules is how it exposes them, not a circle, so package -> own submodule edges are skipped."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = "black"
        return None

    for start in sorted(graph):
        if start not in colour and (cycle := visit(start)):
            return cycle
    return None


def test_every_top_level_part_has_a_layer():
    tops = {module.split(".")[1] if "." in module else "__init__" for module in source_modules()}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_no_import_circles():
    assert find_cycle(internal_graph()) is None, f"import circle: {' -> '.join(find_cycle(internal_graph()))}"


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def test_no_upward_imports():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in internal_graph().items() for target in sorted(targets)
              if layer(target) > layer(module) and not target.startswith(module + ".")]
    assert not upward, "\n".join(upward)


def test_maths_imports_no_stage_and_no_collectives():
    bad = []
    for name, path in source_modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in MATHS:
            bad += [f"{name} imports {m}" for m in sorted(imports_of(path, name))
                    if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_MATHS)]
    assert not bad, "\n".join(bad)


def test_the_package_imports_no_launcher_and_launchers_only_the_entry_and_stages():
    modules = source_modules()
    into_launchers = [n for n, p in modules.items() if any(m.startswith("launcher") for m in imports_of(p, n))]
    assert not into_launchers
    for path in (ROOT / "launcher").glob("*.py"):
        used = {m for m in imports_of(path, f"launcher.{path.stem}") if m.startswith("dist_sense")}
        assert used and all(m.startswith(("dist_sense.cli", "dist_sense.stages")) for m in used), (path, used)


@pytest.mark.parametrize("folder", ["dist_sense", "launcher", "bench"])
def test_module_and_function_sizes(folder):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)
