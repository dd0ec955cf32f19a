"""Extra links resolve to pages that exist: a gate run against a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from conftest import mlflow_conn

from resque_airflow.operators.links import GATE_RUN, MODEL_VERSION, ResqueGateRunLink, record_links
from resque_airflow.registry.links import ui_base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("mlflow server did not start")
    yield url
    proc.terminate()
    proc.wait(30)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status


def test_links_resolve_to_existing_pages(server, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    from resque_airflow.hooks.mlflow import MlflowHook

    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", mlflow_conn(server))
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    exp = client.create_experiment("links")
    run = client.create_run(exp)
    client.create_registered_model("m")
    mv = client.create_model_version("m", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)

    class Op:  # what the worker hands get_link: the operator that ran
        pass

    op = Op()
    out = record_links(op, MlflowHook(), client, run_id=run.info.run_id, model=("m", mv.version), run_key=GATE_RUN)
    assert ResqueGateRunLink().get_link(op, ti_key=None) == out[GATE_RUN]
    for key in (GATE_RUN, MODEL_VERSION):
        parts = urlsplit(out[key])
        assert f"{parts.scheme}://{parts.netloc}" == server and _get(f"{server}{parts.path or '/'}") == 200
    assert f"#/experiments/{exp}/runs/{run.info.run_id}" in out[GATE_RUN]
    assert f"#/models/m/versions/{mv.version}" in out[MODEL_VERSION]
    # what the fragments name exists on that server
    assert _get(f"{server}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}") == 200
    assert _get(f"{server}/api/2.0/mlflow/model-versions/get?name=m&version={mv.version}") == 200


def test_a_sqlite_registry_links_only_with_a_ui_url():
    assert ui_base("sqlite:////tmp/x.db") is None
    assert ui_base("sqlite:////tmp/x.db", "http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert ui_base("http://user:secret@mlflow:5000") == "http://mlflow:5000"
