"""The layers import one way: core <- runtime <- registry <- operators / hooks / cli / ui (docs/ARCHITECTURE.md).

Every import counts, including the ones inside functions (they are how heavy modules stay off the parse path, and
they are imports all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "resque_airflow"

FRAMEWORKS = ("airflow", "mlflow", "onnxruntime", "onnx", "torch", "fastapi")
UPPER = ("operators", "hooks", "cli", "ui", "demo", "examples", "retrain")

# layer -> import prefixes it must never use
FORBIDDEN = {
    "errors": ("resque_airflow", *FRAMEWORKS),
    "core": (
        *FRAMEWORKS,
        "resque_airflow.runtime",
        "resque_airflow.registry",
        *(f"resque_airflow.{u}" for u in UPPER),
    ),
    "runtime": ("airflow", "mlflow", "fastapi", "resque_airflow.registry", *(f"resque_airflow.{u}" for u in UPPER)),
    "registry": ("airflow", "fastapi", *(f"resque_airflow.{u}" for u in UPPER)),
}


def imports_of(source: str, filename: str = "<src>") -> list[str]:
    """Every module named by an import statement in ``source`` (absolute names only; relative ones are resolved
    by the caller's layer, and the package uses none)."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def violations(layer: str, source: str, filename: str = "<src>") -> list[str]:
    """The imports in ``source`` that ``layer`` must not use."""
    return [m for m in imports_of(source, filename) if any(m == b or m.startswith(b + ".") for b in FORBIDDEN[layer])]


def layer_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] == "errors.py":
        return "errors"
    return rel.parts[0] if rel.parts[0] in FORBIDDEN else None


def product_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p))


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    found = violations(layer_of(path), path.read_text(), str(path))
    assert not found, f"{path.relative_to(PACKAGE)} ({layer_of(path)}) imports {found}: see docs/ARCHITECTURE.md"


def test_relative_imports_are_not_used():
    # The checker above resolves absolute names only; a relative import would slip past it.
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"


@pytest.mark.parametrize(
    ("layer", "line"),
    [
        ("core", "import onnxruntime"),
        ("core", "from mlflow import MlflowClient"),
        ("core", "def f():\n    import torch"),
        ("core", "from resque_airflow.runtime.embed import Embedder"),
        ("runtime", "from resque_airflow.registry import names"),
        ("runtime", "import mlflow.onnx"),
        ("registry", "from airflow.sdk import BaseOperator"),
        ("registry", "from resque_airflow.operators.gate import ResqueGateOperator"),
        ("errors", "from resque_airflow.core import ClassSums"),
    ],
)
def test_a_wrong_import_is_caught(layer, line):
    assert violations(layer, line)


@pytest.mark.parametrize(
    ("layer", "line"),
    [
        ("core", "import numpy as np\nfrom resque_airflow.errors import ResqueInputError"),
        ("core", "from sklearn.cluster import KMeans"),
        ("runtime", "import onnxruntime\nfrom resque_airflow.core.summary import FeatureSummary"),
        ("registry", "import mlflow\nfrom resque_airflow.runtime import pipeline"),
    ],
)
def test_allowed_imports_pass(layer, line):
    assert not violations(layer, line)
