"""The layers of docs/DESIGN-NOTES.md hold in the code: every import (lazy ones inside functions too)
points to the importer's floor or a lower one, no circle, no private name imported from another
module, no inference module importing training; files stay under 400 lines, functions under 50."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffusekit"
NOTES = ROOT / "docs" / "DESIGN-NOTES.md"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50
# Functions still over MAX_FUNCTION_LINES, each to be split; this list only ever shrinks.
LONG_FUNCTIONS: set[str] = set()


def _floors() -> list[tuple[str, list[str]]]:
    """[(floor, [module or package names])] in order, lowest first, from the marked table."""
    text = NOTES.read_text()
    table = text[text.index("<!-- floors:begin -->"):text.index("<!-- floors:end -->")]
    floors = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] not in ("floor", "---", "") and "`" in cells[1]:
            floors.append((cells[0], [n.strip("/") for n in re.findall(r"`([^`]+)`", cells[1])]))
    return floors


def _inference() -> list[str]:
    text = NOTES.read_text()
    part = text[text.index("<!-- inference -->"):text.index("<!-- /inference -->")]
    return [n.strip("/") for n in re.findall(r"`([^`]+)`", part)]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("diffusekit", *path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported diffusekit module, names taken from it) for every import statement, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "diffusekit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] == "diffusekit":
                found.append((base, [a.name for a in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> the diffusekit modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for base, names in _imports(name, path):
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            targets = subs if subs and len(subs) == len(names) else [base, *subs]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def _floor_of(module: str, floors) -> int | None:
    best, level = -1, None
    for i, (_, names) in enumerate(floors):
        for n in names:
            full = "diffusekit" if n == "diffusekit" else f"diffusekit.{n}"
            if (module == full or module.startswith(full + ".")) and len(full) > best:
                best, level = len(full), i
    return level


def test_the_floor_table_is_read():
    floors = _floors()
    assert [f for f, _ in floors][:2] == ["base", "math"] and len(floors) >= 8
    assert "pipeline" in _inference()


def test_every_module_has_a_floor():
    floors = _floors()
    assert [m for m in MODULES if _floor_of(m, floors) is None] == []


def test_no_back_arrows():
    """A module imports its own floor or a lower one (a circle between floors is then impossible too)."""
    floors = _floors()
    back = []
    for src, targets in _edges().items():
        for dst in targets:
            a, b = _floor_of(src, floors), _floor_of(dst, floors)
            if a is not None and b is not None and b > a:
                back.append(f"{src} ({floors[a][0]}) -> {dst} ({floors[b][0]})")
    assert back == []


def test_every_import_names_a_module_that_exists():
    missing = [f"{name}: {base}" for name, path in MODULES.items() for base, _ in _imports(name, path)
               if base not in MODULES]
    assert missing == []


def test_back_arrow_check_can_fail():
    floors = _floors()
    assert _floor_of("diffusekit.training.skeleton", floors) > _floor_of("diffusekit.nn.unet", floors)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_edges()) == []


def test_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_private_name_imported_from_another_module():
    private = []
    for name, path in MODULES.items():
        for base, names in _imports(name, path):
            private += [f"{name}: from {base} import {n}" for n in names
                        if n.startswith("_") and not n.endswith("__") and base != name]
    assert private == []


def test_inference_never_imports_training():
    inference = tuple(f"diffusekit.{n}" for n in _inference())
    bad = [f"{src} -> {dst}" for src, targets in _edges().items() if src.startswith(inference)
           for dst in targets if dst == "diffusekit.training" or dst.startswith("diffusekit.training.")]
    assert bad == []


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: str(p.relative_to(SRC)))
def test_small_files_and_functions(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name} has {len(text.splitlines())} lines"
    rel = str(path.relative_to(SRC))
    long = [f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS]
    assert long == []
