"""The package's layout: no import cycle (lazy imports included), the network imports nothing above it, only the
engine side of the server touches tensors, and the tests that need no oracle run without transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "dgemma"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every dgemma module `path` imports, at any depth of the file (function bodies and TYPE_CHECKING too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dgemma")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dgemma"):
                found.add(target)
                # `from . import x` / `from .serving import app` may name submodules
                found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles_lazy_imports_included():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_network_imports_nothing_built_on_it():
    assert graph()["dgemma.model"] <= {"dgemma.compiling", "dgemma.config", "dgemma.fused_ops",
                                       "dgemma.one_query_attention", "dgemma.one_row", "dgemma.token_layer",
                                       "dgemma.widening"}
    assert graph()["dgemma.one_row"] <= {"dgemma.avx2_rows", "dgemma.compiling"}  # kernels, below the network
    assert graph()["dgemma.one_query_attention"] <= {"dgemma.compiling"}
    assert graph()["dgemma.avx2_rows"] <= {"dgemma.compiling"}
    assert graph()["dgemma.fused_ops"] <= {"dgemma.compiling"}
    assert graph()["dgemma.token_layer"] <= {"dgemma.avx2_rows", "dgemma.compiling", "dgemma.fused_ops",
                                             "dgemma.one_row"}
    assert graph()["dgemma.widening"] == set()
    # whether to compile its kernels (an environment setting) and how to multiply in half precision is all it reads
    assert graph()["dgemma.sampling"] <= {"dgemma.compiling", "dgemma.widening"}, \
        "the sampler is pure: no model, cache or tokenizer"


def test_only_the_scheduler_touches_tensors_in_the_server():
    for name in ("service", "responses", "app", "protocol", "settings", "guard"):
        tree = ast.parse((PACKAGE / "serving" / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(m == "torch" or m.startswith("torch.") for m in imported), f"serving/{name}.py imports torch"


def test_tests_that_need_no_oracle_collect_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import pytest; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'not oracle', 'tests']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(collected) > 100, result.stdout[-2000:]
