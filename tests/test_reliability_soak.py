"""Reliability catalogue, part 5: load. Smoke test of the soak benchmark (``benchmarks/soak.py --quick``).

The soak itself (200 gates) is a measurement reported in docs/RELIABILITY.md; here 20 gates run in a subprocess
and the report must be complete: every gate recorded, tags consistent, time and RSS per gate. No timing is
asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_soak_quick_runs_and_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "soak-sqlite.json").read_text())
    assert report["runs_done"] == report["runs_asked"] == 20 and report["failures"] == 0
    assert report["every_gate_recorded"] and report["recorded_decided"] == 20 and report["tags_consistent"]
    assert len(report["per_gate_s"]) == len(report["rss_mib"]) == 20
    for key in (
        "time_first_window_mean_s",
        "time_last_window_mean_s",
        "time_slope_ms_per_gate",
        "rss_slope_kib_per_gate",
    ):
        assert isinstance(report[key], float)
    assert "| time per gate, first 5 (mean) |" in proc.stdout and report["command"].endswith(
        "--quick --out " + str(tmp_path)
    )
    assert not list(tmp_path.glob("resque-soak-*"))  # its temporary registry is removed
