"""DAG parsing stays cheap: the example DAGs import neither torch, MLflow, ONNX Runtime nor scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

HEAVY = ("torch", "mlflow", "onnxruntime", "onnx", "sklearn")


@pytest.mark.parametrize("dag_file", ["resque_gate.py", "resque_gate_sharded.py"])
def test_parsing_an_example_dag_imports_no_heavy_module(dag_file):
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("d", {str(REPO / "dags" / dag_file)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps({{"dag_id": module.dag.dag_id, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dag_id"] == dag_file.removesuffix(".py")
    assert result["heavy"] == []
