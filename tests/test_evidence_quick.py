"""Smoke test of the evidence benchmark: ``benchmarks/evidence.py --quick`` runs and writes its tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST_COLUMNS = {
    "shift_type", "severity", "seed", "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd", "ks",
    "separability", "confidence_drop", "acc_drop", "steps_to_target", "epochs_to_target", "censored", "grad_norm",
    "param_change", "wall_s", "energy_kwh", "emissions_kg",
}  # fmt: skip
TASK_COLUMNS = {
    "task", "seed", "resque_task", "steps_to_target", "epochs_to_target", "censored", "grad_norm", "param_change",
    "wall_s", "energy_kwh", "emissions_kg",
}  # fmt: skip


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_writes_every_output(tmp_path):
    out = tmp_path / "evidence"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "evidence.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = read(out / "dist_runs.csv")
    assert set(dist[0]) >= DIST_COLUMNS
    assert {r["shift_type"] for r in dist} == {"none", "gaussian_noise", "salt_and_pepper", "gaussian_blur",
                                              "contrast", "rotation"}  # fmt: skip
    tasks = read(out / "task_runs.csv")
    assert set(tasks[0]) >= TASK_COLUMNS
    corr = read(out / "correlations_dist.csv")
    assert {"group", "signal", "cost", "spearman", "spearman_lo", "spearman_hi", "pearson"} <= set(corr[0])
    assert {r["group"] for r in corr} >= {"pooled", "rotation"}
    assert read(out / "correlations_task.csv")
    for name in ("correlations.md", "loto.md", "resque_dist_vs_steps.png", "loto.csv", "thresholds.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True
    assert set(summary["thresholds"]) == {"reuse_threshold", "rebuild_threshold"}
    assert "loto_cost_model_spearman" in summary["goals"]
