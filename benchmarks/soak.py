"""Soak: many consecutive gate runs against one registry; reports growth in memory (RSS) and time per gate.

Each gate is the operator's path without a scheduler: ``run_gate`` with an Airflow task-instance key (so the
earlier-try search runs too), a fresh download of the model and fingerprint, one ONNX Runtime pass, the gate run
and the model-version tags. The registry is a SQLite database (``--backend sqlite``, the default) or a local
``mlflow server`` process on 127.0.0.1 (``--backend server``, started and stopped here).

What is reported (JSON in ``--out`` and a Markdown summary on stdout): mean time per gate over the first and the
last ``--window`` gates, the least-squares slope of time per gate, RSS after each gate (after ``gc.collect()``)
with its slope after the first window (steady state), and whether every gate run was recorded and the tags are
consistent at the end. It is a measurement, not a pass/fail test; ``--max-seconds`` bounds the run.

    python benchmarks/soak.py                      # 200 gates on SQLite
    python benchmarks/soak.py --backend server     # 200 gates through a local mlflow server
    python benchmarks/soak.py --quick              # 20 gates: the smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from machine import rss_mib
from workloads import quadrant_images as images


def tiny_cnn(path: Path, seed: int = 0) -> Path:
    """A 4-class CNN on (N, 1, 8, 8) inputs built with onnx.helper (no torch): Conv-Relu-Conv-Relu-GAP-Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(0, 0.4, (8, 1, 3, 3)), "b1": np.zeros(8), "w2": rng.normal(0, 0.2, (16, 8, 3, 3)),
        "b2": np.zeros(16), "w3": rng.normal(0, 0.3, (4, 16)), "b3": np.zeros(4),
    }  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
        ],
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes a newer IR version than ONNX Runtime 1.31 loads (DESIGN.md 4)
    path.write_bytes(model.SerializeToString())
    return path


class Server:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, served artifacts), in its own process group."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        cmd = [
            str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
            f"sqlite:///{self.root / 'server.db'}", "--serve-artifacts", "--artifacts-destination",
            str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.root / "server.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (0 with fewer than 2 values)."""
    return float(np.polyfit(np.arange(len(values)), values, 1)[0]) if len(values) > 1 else 0.0


def soak(uri: str, work: Path, runs: int, max_seconds: float, rows: int) -> dict:
    """Publish a tiny CNN to ``uri``, run ``runs`` gates (at most ``max_seconds``) on ``rows`` rows each.

    Returns the raw series (seconds and RSS per gate), the failures and what the registry recorded.
    """
    from resque_airflow.registry import names
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, Origin, run_gate
    from resque_airflow.registry.names import LAST_GATE_TAG
    from resque_airflow.registry.publish import publish_model

    x, y = images(500, seed=1)
    np.savez(work / "ref.npz", x=x, y=y)
    publish_model(
        tracking_uri=uri, name="soak-cnn", model_path=tiny_cnn(work / "cnn.onnx"), reference=str(work / "ref.npz")
    )
    data = []
    for i, shift in enumerate((0.0, 0.2, 0.5, 1.0)):
        x, y = images(rows, seed=10 + i, shift=shift)
        np.savez(work / f"new-{i}.npz", x=x, y=y)
        data.append(str(work / f"new-{i}.npz"))

    per_gate, rss, failures = [], [], []
    t_start = time.monotonic()
    for i in range(runs):
        if time.monotonic() - t_start > max_seconds:
            break
        request = GateRequest("models:/soak-cnn@champion", data[i % len(data)])
        t0 = time.perf_counter()
        try:
            run_gate(request, client=make_client(uri), origin=Origin("soak", f"run-{i}", "gate", 1))
        except Exception as exc:  # recorded and reported: a soak counts failures, it does not stop at one
            failures.append(f"gate {i}: {type(exc).__name__}: {exc}")
        per_gate.append(time.perf_counter() - t0)
        gc.collect()
        rss.append(rss_mib())
    total = time.monotonic() - t_start

    client = make_client(uri)
    exp = client.get_experiment_by_name(names.DEFAULT_EXPERIMENT)
    recorded = client.search_runs([exp.experiment_id], max_results=50_000)
    decided = [r for r in recorded if r.info.status == "FINISHED" and r.data.tags.get(names.STATUS_TAG) == "decided"]
    tags = client.get_model_version("soak-cnn", "1").tags
    newest = max(decided, key=lambda r: (r.info.end_time, r.info.run_id)) if decided else None
    payload = json.loads(tags.get(LAST_GATE_TAG, "{}"))
    consistent = newest is not None and payload.get("run_id") == newest.info.run_id and all(
        tags.get(t) == str(payload.get(k))
        for t, k in ((names.MV_TAG_SCORE, "score"), (names.MV_TAG_DECISION, "decision"),
                     (names.MV_TAG_GATE_RUN, "run_id"), (names.MV_TAG_TIME, "time"), (names.MV_TAG_MODE, "mode"))
    )  # fmt: skip
    return {"per_gate_s": per_gate, "rss_mib": rss, "failures": failures, "seconds_total": total,
            "recorded_decided": len(decided), "recorded_all": len(recorded), "tags_consistent": consistent}  # fmt: skip


def summarise(raw: dict, *, backend: str, runs_asked: int, window: int, rows: int) -> dict:
    """The report of a soak: means over the first and last ``window`` gates, slopes after the first window, checks."""
    t, m = raw["per_gate_s"], raw["rss_mib"]
    n = len(t)
    w = max(1, min(window, n // 2))
    return {
        "backend": backend,
        "runs_asked": runs_asked,
        "runs_done": n,
        "rows_per_gate": rows,
        "stopped_early": n < runs_asked,
        "failures": len(raw["failures"]),
        "failure_messages": raw["failures"][:10],
        "recorded_decided": raw["recorded_decided"],
        "every_gate_recorded": raw["recorded_decided"] == n - len(raw["failures"]),
        "tags_consistent": raw["tags_consistent"],
        "seconds_total": round(raw["seconds_total"], 1),
        "window": w,
        "time_first_window_mean_s": round(float(np.mean(t[:w])), 4),
        "time_last_window_mean_s": round(float(np.mean(t[-w:])), 4),
        "time_first_window_median_s": round(float(np.median(t[:w])), 4),
        "time_last_window_median_s": round(float(np.median(t[-w:])), 4),
        "time_median_s": round(float(np.median(t)), 4),
        "time_slope_ms_per_gate": round(1000 * slope(t[w:]), 4),
        "rss_after_first_gate_mib": round(m[0], 1),
        "rss_after_first_window_mib": round(m[w - 1], 1),
        "rss_last_mib": round(m[-1], 1),
        "rss_max_mib": round(max(m), 1),
        "rss_slope_kib_per_gate": round(1024 * slope(m[w:]), 2),
        "rss_growth_after_first_window_mib": round(m[-1] - m[w - 1], 1),
    }


def markdown(s: dict, command: str) -> str:
    """The report :func:`summarise` made, as a Markdown table headed by the ``command`` that ran."""
    done = f"{s['runs_done']} / {s['runs_asked']}" + (" (stopped by --max-seconds)" if s["stopped_early"] else "")
    rss = f"{s['rss_after_first_gate_mib']} / {s['rss_after_first_window_mib']} / {s['rss_last_mib']} MiB"
    rows = [
        ("gates (done / asked)", done),
        ("failures", s["failures"]),
        ("every gate run recorded (FINISHED, decided)", s["every_gate_recorded"]),
        ("model-version tags consistent, naming the newest gate", s["tags_consistent"]),
        ("total wall time", f"{s['seconds_total']} s"),
        (f"time per gate, first {s['window']} (mean)", f"{s['time_first_window_mean_s']:.3f} s"),
        (f"time per gate, last {s['window']} (mean)", f"{s['time_last_window_mean_s']:.3f} s"),
        (f"time per gate, first {s['window']} (median)", f"{s['time_first_window_median_s']:.3f} s"),
        (f"time per gate, last {s['window']} (median)", f"{s['time_last_window_median_s']:.3f} s"),
        ("time per gate, median of all", f"{s['time_median_s']:.3f} s"),
        ("time slope after the first window", f"{s['time_slope_ms_per_gate']:+.3f} ms per gate"),
        ("RSS after gate 1 / after the first window / at the end", rss),
        ("RSS slope after the first window", f"{s['rss_slope_kib_per_gate']:+.2f} KiB per gate"),
    ]  # fmt: skip
    lines = [f"Soak, backend `{s['backend']}`, {s['rows_per_gate']} rows per gate: `{command}`", "",
             "| measure | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every gate succeeded, was recorded and the tags are consistent, else 1."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="consecutive gates (default 200)")
    p.add_argument("--quick", action="store_true", help="20 gates, window 5: the smoke test")
    p.add_argument("--max-seconds", type=float, default=1800, help="stop starting gates after this long")
    p.add_argument("--backend", choices=["sqlite", "server"], default="sqlite")
    p.add_argument("--rows", type=int, default=256, help="rows of incoming data per gate")
    p.add_argument("--window", type=int, default=20, help="gates compared at the start and at the end")
    p.add_argument("--out", default=None, help="folder for soak.json (default: print only)")
    p.add_argument("--keep", action="store_true", help="keep the registry's temporary folder")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.window = min(args.runs, 20), 5
    if args.runs < 1 or args.max_seconds <= 0:
        p.error("--runs and --max-seconds must be positive")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    work = Path(tempfile.mkdtemp(prefix="resque-soak-"))
    try:
        if args.backend == "server":
            with Server(work) as server:
                raw = soak(server.uri, work, args.runs, args.max_seconds, args.rows)
        else:
            raw = soak(f"sqlite:///{work / 'mlflow.db'}", work, args.runs, args.max_seconds, args.rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(raw, backend=args.backend, runs_asked=args.runs, window=args.window, rows=args.rows)
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(summary, command.strip()))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"soak-{args.backend}.json").write_text(
            json.dumps(
                summary | {"command": command.strip(), "per_gate_s": raw["per_gate_s"], "rss_mib": raw["rss_mib"]},
                indent=1,
            )
        )
    return 0 if summary["failures"] == 0 and summary["every_gate_recorded"] and summary["tags_consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
