"""The code's shape, checked: the CPU runtime is independent of the GPU packages, and no module
grows past what a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vedrt"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the vedrt modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("vedrt")}


def test_runtime_imports_nothing_of_gpu_or_tensorrt():
    for path in (PACKAGE / "runtime").glob("*.py"):
        for name in imported_modules(path):
            assert not name.startswith(("vedrt.gpu", "vedrt.tensorrt")), f"{path.name}: {name}"


def test_gpu_does_not_import_tensorrt():
    for path in (PACKAGE / "gpu").glob("*.py"):
        for name in imported_modules(path):
            assert not name.startswith("vedrt.tensorrt"), f"{path.name}: {name}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_is_over_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= 430, f"{path}: split it"


def test_loading_the_cpu_runtime_imports_no_torch():
    code = (
        "import sys, vedrt; g = vedrt.load(sys.argv[1]); g.caption([sys.argv[2]], num_beams=2); "
        "bad = [m for m in ('torch', 'transformers', 'vedrt.gpu', 'vedrt.tensorrt') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    scene = PACKAGE / "models" / "scenes"
    image = PACKAGE.parent / "examples" / "scene1.png"
    done = subprocess.run([sys.executable, "-c", code, str(scene), str(image)], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
