"""Smoke test of the throughput benchmark: ``benchmarks/throughput.py --quick --json`` runs and reports every key.

No timing is asserted (CI machines are shared and noisy); the numbers are checked only for being there, positive,
and for the paths agreeing on RESQUE_dist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("torch")
pytest.importorskip("onnxscript")


@pytest.mark.timeout(600)
def test_quick_benchmark_reports_every_key(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    report = json.loads(out.read_text())
    assert printed == report
    for key in (
        "gate_vs_ort", "gate_vs_torch", "gate_vs_reference", "rss_ratio_10x", "max_dist_diff", "model",
        "data_format", "n", "batch_size", "threads", "machine", "models", "resque_task", "data_hash", "met",
        "gate_npz_images_per_s", "ort_images_per_s", "torch_images_per_s", "reference_images_per_s",
        "gate_npz_peak_rss_mb", "gate_npz_10x_peak_rss_mb",
    ):  # fmt: skip
        assert key in report, key
    assert report["quick"] is True and report["model"] == "resnet18" and report["data_format"] == "npz"
    assert {"cpu", "physical_cores", "ram_gib"} <= set(report["machine"])
    for name, m in report["models"].items():
        assert {"gate_npz", "gate_npz_cold", "gate_images", "ort", "torch", "reference"} <= set(m["paths"]), name
        # The first gate edits the graph (onnx); the later ones read the exposed-model cache and load neither onnx
        # nor scikit-learn: the fixed costs and memory docs/PERFORMANCE.md reports.
        assert m["paths"]["gate_npz_cold"]["modules_loaded"] == ["onnx"], name
        assert m["paths"]["gate_npz"]["modules_loaded"] == [], name
        assert {"rss_vs_ort", "rss_vs_ort_cold", "gate_cold_vs_ort"} <= set(m), name
        for path in m["paths"].values():
            assert path["images_per_s"] > 0 and path["peak_rss_mb"] > 0
        # Same model, same data, same fingerprint: every path that yields class sums gives the same score.
        assert m["max_dist_diff"] < 1e-5, m["dist"]
    assert report["rss_ratio_10x"] > 0
    assert report["resque_task"]["full"]["seconds"] > 0
