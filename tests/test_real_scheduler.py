"""The example DAGs under a real Airflow 3 scheduler: ``scripts/real_scheduler.py``, run as a user would run it.

The script starts ``mlflow server``, ``airflow api-server``, ``scheduler`` (LocalExecutor), ``dag-processor`` and
``triggerer`` on 127.0.0.1, triggers the DAGs over the REST API, approves the costly retrain through the
human-in-the-loop endpoint and checks what each step left (branch, XCom, MLflow gate run, extra links against the
server, the asset-triggered retrain run and its event, the measured cost written back). Here we check its exit code
and the summary it writes; about 2 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.server]
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "real_scheduler.py"


def test_example_dags_run_under_a_real_scheduler(tmp_path):
    home = tmp_path / "stack"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--home", str(home)], capture_output=True, text=True,
                          timeout=1500)  # fmt: skip
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in (home / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + logs
    summary = json.loads((home / "summary.json").read_text())
    assert summary["ok"] is True
    gate = summary["gate"]
    assert gate["states"]["gate"] == "success" and gate["states"][gate["branch"]] == "success"
    assert set(gate["links"]) == {"MLflow gate run", "MLflow model version"}
    assets = summary["assets"]
    assert assets["decision"] in ("retrain", "rebuild") and assets["states"]["approve"] == "success"
    assert assets["retrain_states"]["train"] == "success"
    assert assets["measured"]["measured_steps_to_target"] > 0
    assert "MLflow challenger run" in assets["links"]


def test_a_folder_in_use_is_refused(tmp_path):
    (tmp_path / "something").write_text("x")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--home", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not empty" in proc.stderr
