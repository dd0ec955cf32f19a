"""Shared parts of the reliability catalogue (docs/RELIABILITY.md); this module holds no tests.

- :class:`MlflowServer`: a real ``mlflow server`` process on 127.0.0.1 (SQLite backend, served artifacts) that a
  test can kill and restart; always stopped by its fixture.
- :func:`mlp_onnx`: a tiny (N, 6) -> 3-class MLP built with ``onnx.helper`` (Parquet data needs an (N, D) model).
- Audit-trail readers: gate runs, model-version tags, and the consistency check of the tags.
- :class:`FakeTI` and :func:`operator_gate`: the operator's own logic (``choose_branch``) without a scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resque_airflow.registry import names
from resque_airflow.registry.client import make_client

SERVER_START_S = 120  # an mlflow server with a fresh SQLite database takes ~20 s to answer on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and artifacts served over HTTP, in ``root``.

    Started in its own process group so that :meth:`kill` ends the server and the uvicorn worker it spawns, and
    nothing else. MLflow's background job runner (a dozen huey processes) is switched off: the gate needs none.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - the process keeps it open
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {SERVER_START_S} s: {self.log_tail()}")

    def log_tail(self) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-2000:] if logs else ""

    def kill(self) -> None:
        """SIGKILL the server's process group (no clean shutdown, as when a machine or container dies)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None


def mlp_onnx(path: Path, *, seed: int = 0) -> Path:
    """A 3-class MLP on (N, 6) float inputs, as an ONNX file; its representation is the hidden layer (N, 16)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.5, (6, 16)).astype(np.float32), np.zeros(16, np.float32)
    w2, b2 = rng.normal(0, 0.5, (16, 3)).astype(np.float32), np.zeros(3, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes a newer IR version than ONNX Runtime 1.31 loads (DESIGN.md 4)
    path.write_bytes(model.SerializeToString())
    return path


def mlp_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 6)).astype(np.float32) + np.eye(3, 6, dtype=np.float32)[y] * 2
    return x, y.astype(np.int64)


# Audit trail ---------------------------------------------------------------------------------------------------
def gate_runs(uri: str, *, deleted: bool = False, experiment: str = names.DEFAULT_EXPERIMENT) -> list:
    """Gate runs of ``experiment`` (active ones, or all with ``deleted=True``); [] when it does not exist yet."""
    from mlflow.entities import ViewType

    client = make_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([exp.experiment_id], run_view_type=view, max_results=5000)


def decided_run_ids(uri: str) -> set[str]:
    """Gate runs marked successful: FINISHED with ``resque.status=decided``."""
    return {
        r.info.run_id
        for r in gate_runs(uri)
        if r.info.status == "FINISHED" and r.data.tags.get(names.STATUS_TAG) == "decided"
    }


def mv_tags(uri: str, name: str, version: str = "1") -> dict:
    return dict(make_client(uri).get_model_version(name, version).tags)


def newest_gate(runs: list) -> object:
    """The newest of ``runs`` by the gate's time (the run's end time), then run id: the one the tags must name."""
    return max(runs, key=lambda r: (r.info.end_time, r.info.run_id))


def check_tags_name(tags: dict, run) -> None:
    """Assert the model-version tags are consistent and all describe gate run ``run``."""
    from resque_airflow.registry.client import iso_time as _iso
    from resque_airflow.registry.names import LAST_GATE_TAG

    payload = json.loads(tags[LAST_GATE_TAG])
    fields = {
        names.MV_TAG_SCORE: "score", names.MV_TAG_DECISION: "decision", names.MV_TAG_GATE_RUN: "run_id",
        names.MV_TAG_TIME: "time", names.MV_TAG_MODE: "mode",
    }  # fmt: skip
    for tag, key in fields.items():
        assert tags[tag] == str(payload[key]), (tag, tags[tag], payload)
    assert payload["run_id"] == run.info.run_id, (payload, run.info.run_id)
    assert payload["time"] == _iso(run.info.end_time)
    assert payload["decision"] == run.data.tags[names.DECISION_TAG]
    assert payload["score"] == run.data.metrics[names.SCORE_METRIC]
    assert payload["mode"] == run.data.params["mode"]


# The operator's logic, without a scheduler ---------------------------------------------------------------------
@dataclass
class FakeTI:
    """The task-instance fields ``ResqueGateOperator.choose_branch`` reads."""

    dag_id: str = "reliability"
    run_id: str = "manual__1"
    task_id: str = "gate"
    try_number: int = 1
    map_index: int = -1
    pushed: dict = field(default_factory=dict)

    def xcom_push(self, key: str, value) -> None:
        self.pushed[key] = value


def operator_gate(conn_id: str, ti: FakeTI | None = None, **kwargs) -> list[str]:
    """Build a ``ResqueGateOperator`` and run its branch choice as a task would; returns the branch."""
    from resque_airflow.operators.gate import ResqueGateOperator

    op = ResqueGateOperator(
        task_id="gate", retrain_task_id="retrain", rebuild_task_id="rebuild", reuse_task_id="reuse",
        mlflow_conn_id=conn_id, **kwargs,
    )  # fmt: skip
    return op.choose_branch({"ti": ti or FakeTI()})


def drop_stale_log_handlers() -> None:
    """Remove log handlers that write to a closed stream.

    Importing Airflow in a test process attaches a handler to the root logger on the ``sys.stderr`` of that moment:
    pytest's capture of an earlier test, closed since. The CLI run in-process would then print logging's own
    "Logging error" report on stderr, which is not the CLI's output (run as a command, it imports no Airflow).
    """
    for logger in [logging.root, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in list(getattr(logger, "handlers", [])):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
