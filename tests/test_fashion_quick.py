"""Smoke test of the Fashion-MNIST benchmark: ``benchmarks/fashion_mnist.py --quick`` runs end to end and RESQUE_dist
rises with the shift's severity within each shift type of its tiny grid.

Skips, with the one-line install hint, when Fashion-MNIST is not installed and cannot be installed here.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fashion_data  # noqa: E402  (the benchmark's data module: numpy and scipy only)

DIST_COLUMNS = {
    "model_family", "shift_type", "severity", "seed", "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd",
    "ks", "separability", "confidence_drop", "acc_drop", "steps_to_target", "epochs_to_target", "censored",
    "accuracy_at_cap", "grad_norm", "grad_norm_mean", "param_change", "wall_s", "energy_kwh", "emissions_kg",
    "gate_score", "gate_label_source", "load1",
}  # fmt: skip
TASK_COLUMNS = {
    "model_family", "task", "seed", "resque_task", "resque_task_kmeanspp", "steps_to_target", "epochs_to_target",
    "censored", "accuracy_at_cap", "grad_norm", "param_change", "wall_s",
}  # fmt: skip


def _ensure_data() -> None:
    try:
        fashion_data.load_fashion()
        return
    except fashion_data.DataMissing:
        pass
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-fashion-mnist.sh")], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.skip(fashion_data.INSTALL_HINT)
    try:
        fashion_data.load_fashion()
    except fashion_data.DataMissing:
        pytest.skip(fashion_data.INSTALL_HINT)


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(400)
def test_quick_fashion_benchmark(tmp_path):
    _ensure_data()
    out = tmp_path / "fashion"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fashion_mnist.py"), "--quick", "--no-energy", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    dist = read(out / "dist_runs.csv")
    assert set(dist[0]) >= DIST_COLUMNS
    assert {r["shift_type"] for r in dist} == {"none", "gaussian_noise", "contrast"}
    for r in dist:  # accuracy at the cap is recorded exactly for the censored runs
        assert (r["accuracy_at_cap"] != "") == (r["censored"] == "1")
    tasks = read(out / "task_runs.csv")
    assert set(tasks[0]) >= TASK_COLUMNS
    for name in ("correlations_dist.csv", "correlations_task.csv", "loto.csv", "report.md",
                 "resnet18_resque_dist_vs_steps.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["load_average"]["start"]
    assert summary["families"]["resnet18"]["source"]["clean_official_test_accuracy"] > 0.1

    # RESQUE_dist grows with severity within each shift type (no-shift runs as severity 0).
    for shift, rho in summary["resque_vs_severity"]["resnet18"].items():
        assert not math.isnan(rho) and rho > 0, (shift, rho)
