"""The import arrows that docs/ARCHITECTURE.md forbids, checked statically over the source tree.

Beside the light-import test (tests/test_dispatch.py runs ``import mosbits`` in a subprocess and looks at
``sys.modules``), this reads every module's import statements, so an arrow is caught even on a path no test
executes. Module-level imports run at import time; imports inside a function run when it is called. Each rule is
also run once on a small tree that breaks it, so that a rule that can never fire is noticed.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"mosbits": "mosbits", "mosbits.backends": "backends", "mosbits.reference": "reference"}
"""Import name -> folder, as pyproject.toml's package-dir maps them."""
CORE = {"mosbits", "mosbits.api", "mosbits.arrays", "mosbits.dispatch", "mosbits.experts", "mosbits.format",
        "mosbits.io", "mosbits.precision", "mosbits.prepared", "mosbits.testing", "mosbits.threads",
        "mosbits.backends"}
"""The modules a runtime or kernel author needs; ``mosbits.backends`` is the registry's package, not a backend."""
ABOVE_CORE = ("mosbits.hf", "mosbits.cli", "mosbits.perf", "mosbits.export")
"""The layers built on the core: the training adapter, the command line, benchmark support, ONNX export."""
HEAVY = ("torch", "numba", "llvmlite", "triton", "transformers", "onnx", "onnxruntime", "accelerate")
"""Optional libraries the core may import only inside functions (when a caller hands it their arrays)."""


def module_files(root: Path) -> dict[str, Path]:
    """Import name -> source file of every module under the package folders of ``root``."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path, module: str, modules: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, at import time, line) for each import statement of a module file; ``from a import b``
    names ``a.b`` when that is a module of the tree, else ``a``; relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    name = f"{base}.{alias.name}"
                    found.append((name if name in modules else base, top, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return found


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def backend_of(name: str) -> str | None:
    """``numba`` for mosbits.backends.numba._kernels, ``torch_ops`` for mosbits.backends.torch_ops; None
    outside the concrete backends."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["mosbits", "backends"] else None


def violations(root: Path) -> list[str]:
    """Every forbidden arrow in the tree at ``root``, as ``"file:line: module -> imported (rule)"``."""
    files = module_files(root)
    modules = set(files)
    stdlib = set(sys.stdlib_module_names)
    found = []
    for module, path in files.items():
        for target, top, line in imports(path, module, modules):
            where = f"{path.relative_to(root)}:{line}: {module} -> {target}"
            if module in CORE:
                if backend_of(target):
                    found.append(f"{where} (core imports a concrete backend)")
                if within(target, ABOVE_CORE):
                    found.append(f"{where} (core imports a layer above it)")
                if top and within(target, HEAVY):
                    found.append(f"{where} (core imports an optional library at import time)")
            if within(module, "mosbits.reference") and target.split(".")[0] not in {"numpy", "__future__"} | stdlib:
                found.append(f"{where} (the reference imports something other than NumPy)")
            source, dest = backend_of(module), backend_of(target)
            if source and dest and source != dest:
                found.append(f"{where} (one backend imports another)")
            if source and within(target, (*ABOVE_CORE, "mosbits.testing")):
                found.append(f"{where} (a backend imports the adapter, the CLI, benchmarks or tests)")
            if within(module, ("mosbits.hf", "mosbits.perf", "mosbits.export")) and within(target, "mosbits.cli"):
                found.append(f"{where} (a library layer imports the command line)")
            if within(module, "mosbits.perf") and within(target, ("mosbits.hf", "mosbits.export")):
                found.append(f"{where} (benchmark support imports the adapter or the exporters)")
    return found


def test_the_tree_has_no_forbidden_arrow():
    assert module_files(ROOT).keys() >= CORE | {"mosbits.backends.numba", "mosbits.reference", "mosbits.hf"}
    assert violations(ROOT) == []


BROKEN = {
    "mosbits/api.py": "from mosbits.backends.numba import _kernels\n",
    "mosbits/format.py": "import torch\n",
    "mosbits/io.py": "def load():\n    from mosbits.hf import quantizer\n",
    "reference/__init__.py": "from mosbits import arrays\n",
    "backends/numba/__init__.py": "from mosbits.backends import torch_ops\n",
    "backends/torch_ops.py": "def f():\n    import mosbits.hf.layers\n",
    "mosbits/hf/layers.py": "from mosbits.cli import demo\n",
    "mosbits/perf/workloads.py": "from ..hf import layers\n",
}
ALLOWED = {
    "mosbits/arrays.py": "def torch_of(x):\n    import torch\n",
    "mosbits/__init__.py": "from mosbits import backends, reference\n",
    "reference/extra.py": "import math\nimport numpy as np\n",
    "backends/numba/_kernels.py": "from . import _simd\n",
    "mosbits/export/model.py": "from mosbits.hf.layers import PackedMoSLinear\n",
    "mosbits/cli/demo.py": "from mosbits.perf import workloads\n",
}


@pytest.mark.parametrize("relative", list(BROKEN))
def test_each_rule_fires_on_a_tree_that_breaks_it(tmp_path, relative):
    for name in (*BROKEN, *ALLOWED, "mosbits/cli/__init__.py", "mosbits/hf/__init__.py", "mosbits/perf/__init__.py",
                 "backends/numba/_simd.py", "mosbits/export/__init__.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(ALLOWED.get(name, "")))
    assert violations(tmp_path) == []
    (tmp_path / relative).write_text(BROKEN[relative])
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{relative}:"), found
