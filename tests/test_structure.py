"""The package reads in one direction: no import cycles between its modules (function-level imports count;
a module's `if __name__ == "__main__":` entry block does not, it runs as another module)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "sglang_shplb"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not _is_main_block(n)]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in (n for top in body for n in ast.walk(top)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in mods else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert "sglang_shplb.budget" in graph["sglang_shplb.joint"]        # the scan sees imports at all
    assert _cycles(graph) == []


def test_the_shipping_surface_is_small_and_unconfusable():
    """At most 14 --shplb-* flags (request limits included), no two one edit apart; the registry lists only what
    serving offers, each implemented on CPU and by the CUDA kernels; the oracle is a reference serving refuses."""
    from sglang_shplb import selection as sel
    from sglang_shplb.gpu_decode import gpu_implements
    from sglang_shplb.launch_server import shplb_parser
    from sglang_shplb.sparse_prefill import DEFAULT_ESTIMATE, ESTIMATES

    flags = [o for a in shplb_parser()._actions for o in a.option_strings if o.startswith("--shplb-")]
    assert len(flags) <= 14, flags

    def one_edit(a: str, b: str) -> bool:
        if abs(len(a) - len(b)) > 1 or a == b:
            return False
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]
    assert not [(a, b) for a in flags for b in flags if a < b and one_edit(a, b)]
    assert set(sel.SELECTORS) == {sel.DEFAULT_SELECTOR, sel.UNCALIBRATED_SELECTOR}
    assert all(gpu_implements(r) for r in sel.SELECTORS.values())
    assert sel.ORACLE.name not in sel.SELECTORS and ESTIMATES == (DEFAULT_ESTIMATE, "oracle")


def test_ruff_finds_nothing():
    """The lint configured in pyproject.toml ([tool.ruff]; `make install` installs ruff) holds for the whole tree."""
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), f"{ruff} missing: `make install` installs ruff"
    proc = subprocess.run([str(ruff), "check", str(PKG.parents[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_package_function_over_80_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(PKG)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_imports_run_one_way_tests_to_benchmarks():
    """Benchmarks never import the test suite (its harness, the launcher wrapper, lives in benchmark/harness.py);
    tests may import benchmark modules; the package imports neither."""
    root = PKG.parents[1]
    for path in (root / "benchmark").glob("*.py"):
        text = path.read_text()
        assert "conftest" not in text.replace("conftest.py", "") and '"tests"' not in text, path.name
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("conftest", "harness", "common", "rows") for n in names), path
