"""Reliability catalogue, part 4: security (docs/RELIABILITY.md, section "Security").

- nothing on the load path can unpickle: a scan of the package's syntax trees;
- artifacts from the registry cannot reach outside the download folder (links planted in a download);
- the ONNX file's sha256 is checked before any ONNX Runtime session exists;
- connection passwords and tokens reach the MLflow server (through an authenticating proxy) and nowhere else:
  not the logs, not XCom, not MLflow params, tags, metrics or artifacts, not the requests' bodies.
"""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, flip_byte, make_images
from test_reliability_support import FakeTI, MlflowServer, decided_run_ids, gate_runs, mv_tags

from resque_airflow.errors import FingerprintError, RegistryError

# Imported here, not in a test: importing Airflow configures logging, which would drop pytest's log capture.
from resque_airflow.operators.gate import ResqueGateOperator
from resque_airflow.registry import names
from resque_airflow.registry.artifacts import check_inside
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate
from resque_airflow.registry.publish import publish_model

SECRET = "s3cr3t-R3SQUE-do-not-leak"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


# No pickle ------------------------------------------------------------------------------------------------------
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {
    "mlflow.pyfunc.load_model", "mlflow.pytorch.load_model", "mlflow.sklearn.load_model", "pd.read_pickle",
    "pandas.read_pickle", "torch.jit.load", "np.lib.format.read_array",
}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unpickling_sites(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that can unpickle (or run code from) what it loads."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name in UNPICKLING_CALLS or name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            if "allow_pickle" in kwargs and not (
                isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False
            ):
                found.append(f"{where}: {name}(allow_pickle=<not False>)")
            if name.endswith("torch.load"):
                weights_only = kwargs.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: {name}() without weights_only=True")
    return found


def test_scanner_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\nimport mlflow\n"
        "torch.load('w.pt')\ntorch.load('w.pt', weights_only=False)\nnp.load('x.npy', allow_pickle=True)\n"
        "mlflow.pyfunc.load_model('m')\neval('1')\n"
    )
    assert len(unpickling_sites(bad, "bad.py")) == 7
    good = "import torch\nimport numpy as np\ntorch.load('w', weights_only=True)\nnp.load('x', allow_pickle=False)\n"
    assert unpickling_sites(good, "good.py") == []


def test_no_pickle_on_the_load_path():
    """The package, its DAGs and plugin: no pickle import, no allow_pickle, torch.load only with weights_only."""
    files = [p for folder in ("resque_airflow", "dags", "plugins") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    found = [site for p in files for site in unpickling_sites(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []
    for p in files:  # and the plain-text form, wherever it might hide (strings passed on, comments aside)
        text = "\n".join(line.split("#")[0] for line in p.read_text().splitlines())
        assert "allow_pickle=True" not in text.replace(" ", ""), p


# Downloads stay inside their folder ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "plant",
    ["absolute-file-link", "absolute-folder-link", "relative-dotdot-link", "link-in-subfolder"],
)
def test_check_inside_refuses_links_that_escape(plant, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    root = tmp_path / "download"
    (root / "model" / "extra_files").mkdir(parents=True)
    (root / "model" / "model.onnx").write_bytes(b"onnx")
    os.symlink("model.onnx", root / "model" / "alias.onnx")  # a link that stays inside is fine
    check_inside(root)
    if plant == "absolute-file-link":
        os.symlink(outside / "secret.txt", root / "model" / "extra_files" / "fingerprint.npz")
    elif plant == "absolute-folder-link":
        os.symlink(outside, root / "model" / "extra_files" / "more")
    elif plant == "relative-dotdot-link":
        os.symlink("../../outside/secret.txt", root / "model" / "stolen.txt")
    else:
        os.symlink("../../../outside", root / "model" / "extra_files" / "up")
    with pytest.raises(RegistryError, match="points outside the download folder"):
        check_inside(root)


@pytest.fixture(scope="module")
def registry(cnn_registry):
    uri, root = cnn_registry("security", ("cnn", "tamper-me"), new=(200, 2, 0.3), gate=True)
    return uri, str(root / "new.npz")


@pytest.fixture
def sessions(monkeypatch):
    """Count ONNX Runtime sessions created from now on."""
    import onnxruntime

    made = []
    real = onnxruntime.InferenceSession

    def spy(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return made


def test_download_that_escapes_is_refused_before_anything_runs(registry, sessions, monkeypatch, tmp_path):
    """A registry whose download plants a link to outside: refused, no session, no gate run, no tag."""
    import mlflow.artifacts

    uri, data = registry
    real = mlflow.artifacts.download_artifacts
    (tmp_path / "outside.txt").write_text("not yours")

    def download_with_a_planted_link(**kwargs):
        local = real(**kwargs)
        os.symlink(tmp_path / "outside.txt", Path(local) / "extra_files" / "planted")
        return local

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_with_a_planted_link)
    decided, runs, tags = decided_run_ids(uri), len(gate_runs(uri)), mv_tags(uri, "cnn")
    with pytest.raises(RegistryError, match="points outside the download folder; refusing it"):
        run_gate(GateRequest("models:/cnn@champion", data), client=make_client(uri))
    assert sessions == []
    assert decided_run_ids(uri) == decided and len(gate_runs(uri)) == runs and mv_tags(uri, "cnn") == tags


# The model's sha256 is checked before it runs --------------------------------------------------------------------
def test_tampered_model_never_gets_a_session(registry, sessions, tmp_path, capsys):
    from resque_airflow.cli import main

    uri, data = registry
    run_gate(GateRequest("models:/tamper-me@champion", data), client=make_client(uri))
    assert len(sessions) == 1  # the spy sees the sessions a gate creates
    tags = mv_tags(uri, "tamper-me")
    stored = make_client(uri).get_model_version_download_uri("tamper-me", "1")
    flip_byte(f"{stored}/model.onnx", -10)
    sessions.clear()
    with pytest.raises(FingerprintError, match="recompute the fingerprint"):
        run_gate(GateRequest("models:/tamper-me@champion", data), client=make_client(uri))
    # the same file scored locally, against its (intact) fingerprint
    local = Path(stored.removeprefix("file://"))
    code = main(["score", "dist", "--model", str(local / "model.onnx"), "--fingerprint", str(local / "extra_files"),
                 "--data", data])  # fmt: skip
    assert code == 2 and "recompute the fingerprint" in capsys.readouterr().err
    assert sessions == []
    assert mv_tags(uri, "tamper-me") == tags


# Credentials ----------------------------------------------------------------------------------------------------
def test_credentials_do_not_bleed_from_one_connection_to_the_next(monkeypatch):
    """Process-wide MLflow credentials: a hook for a connection without any removes what an earlier hook set,
    and leaves what the deployment set itself."""
    from resque_airflow.hooks.mlflow import MlflowHook

    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_WITH_AUTH", json.dumps({"conn_type": "mlflow", "host": "http://a:5000",
                                                               "login": "alice", "password": SECRET}))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_WITH_TOKEN", json.dumps({"conn_type": "mlflow", "host": "http://b:5000",
                                                                "password": SECRET + "-token"}))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_WITHOUT", json.dumps({"conn_type": "mlflow", "host": "http://c:5000"}))
    MlflowHook("with_auth").configure_credentials()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    MlflowHook("with_token").configure_credentials()
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == SECRET + "-token"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ
    MlflowHook("without").configure_credentials()
    assert not any(var in os.environ for var in CREDENTIAL_VARS)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "set-by-the-deployment")
    MlflowHook("without").configure_credentials()
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "set-by-the-deployment"


class AuthProxy:
    """A reverse proxy on 127.0.0.1 that demands HTTP basic auth, forwards to ``upstream``, and records requests."""

    def __init__(self, upstream: str, login: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()
        self.requests: list[dict] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                authorised = self.headers.get("Authorization") == expected
                headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
                requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "body": body,
                        "authorised": authorised,
                        "headers": headers,
                    }
                )
                if not authorised:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                skip = {"authorization", "host", "content-length", "connection", "transfer-encoding"}
                req = urllib.request.Request(
                    upstream + self.path, data=body or None, method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
                )  # fmt: skip
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, headers, data = err.code, err.headers, err.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def everything_mlflow_holds(uri: str, tmp_path: Path) -> str:
    """Every experiment's runs (params, tags, metrics, gate result artifacts) and every model version's tags."""
    from mlflow.entities import ViewType

    client = make_client(uri)
    out = []
    for exp in client.search_experiments(view_type=ViewType.ALL):
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
            out.append(json.dumps([run.data.params, run.data.tags, run.data.metrics, run.info.run_name]))
            if run.data.tags.get(names.KIND_TAG) == names.KIND_GATE and run.info.status == "FINISHED":
                local = client.download_artifacts(run.info.run_id, names.GATE_RESULT_ARTIFACT, str(tmp_path))
                out.append(Path(local).read_text())
    for model in client.search_registered_models():
        out.append(json.dumps(model.tags))
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            out.append(json.dumps([mv.tags, mv.source, mv.description]))
    assert len(out) > 3
    return "\n".join(out)


@pytest.mark.server
def test_connection_credentials_reach_the_server_and_nowhere_else(tmp_path, cnn_onnx, monkeypatch, caplog, capfd):
    """The operator with a login/password connection, in front of a server that demands them.

    Without the credentials every request is refused (401), so the gate succeeding shows they were sent; the
    secret then appears in no log line, no XCom value, nothing MLflow stores, and no request body or URL.
    """
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)  # restored after the test: the hook sets them process-wide
    caplog.set_level(logging.DEBUG, logger="resque_airflow")
    caplog.set_level(logging.INFO)
    server = MlflowServer(tmp_path / "server").start()
    proxy = AuthProxy(server.uri, "resque", SECRET)
    try:
        x, y = make_images(300, seed=1)
        np.savez(tmp_path / "ref.npz", x=x, y=y)
        publish_model(tracking_uri=server.uri, name="cnn", model_path=cnn_onnx[1], reference=str(tmp_path / "ref.npz"))
        x, y = make_images(200, seed=2, shift=0.3)
        np.savez(tmp_path / "new.npz", x=x, y=y)
        with pytest.raises(Exception, match="401"):  # the proxy really refuses requests without the secret
            make_client(proxy.uri).search_experiments(max_results=1)
        monkeypatch.setenv("AIRFLOW_CONN_WITH_AUTH", json.dumps(
            {"conn_type": "mlflow", "host": proxy.uri, "login": "resque", "password": SECRET}))  # fmt: skip
        ti = FakeTI()
        op = ResqueGateOperator(
            task_id="gate", model_name="cnn", data=str(tmp_path / "new.npz"), retrain_task_id="retrain",
            rebuild_task_id="rebuild", mlflow_conn_id="with_auth",
        )  # fmt: skip
        branch = op.choose_branch({"ti": ti})  # the operator's logic; execute() adds the XCom push and the skip
        assert branch in (["retrain"], ["rebuild"])
        authorised = [r for r in proxy.requests if r["authorised"]]
        assert len(authorised) > 10 and any("/artifacts/" in r["path"] for r in authorised)

        places = {
            "logs": caplog.text,
            "stdout/stderr": "".join(capfd.readouterr()),
            "xcom": json.dumps(op.outcome),
            "mlflow": everything_mlflow_holds(server.uri, tmp_path),
            "request bodies and urls": "\n".join(
                r["path"] + json.dumps(r["headers"]) + r["body"].decode("latin-1") for r in proxy.requests
            ),
        }
        for place, text in places.items():
            assert SECRET not in text, place
            assert base64.b64encode(SECRET.encode()).decode() not in text, place
        assert "resque" in places["logs"]  # the capture did see the gate's own log lines
    finally:
        proxy.close()
        server.stop()


@pytest.mark.airflow
def test_dag_run_with_a_password_connection_leaks_nothing(registry, airflow_db, tmp_path, monkeypatch, caplog, capfd):
    """The example DAG through dag.test, with a login/password connection: task logs, XCom (in the metadata
    database), MLflow: no secret anywhere. (A SQLite registry ignores the credentials; the server test above shows
    they are sent.)"""
    import importlib.util

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    uri, data = registry
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(
        {"conn_type": "mlflow", "host": uri, "login": "resque", "password": SECRET}))  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="resque_airflow")
    caplog.set_level(logging.INFO)
    logs_dir = Path(airflow_db) / "logs"
    before = {p: p.stat().st_mtime for p in logs_dir.rglob("*") if p.is_file()} if logs_dir.exists() else {}

    spec = importlib.util.spec_from_file_location("resque_gate", REPO / "dags" / "resque_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The reference data itself and lenient thresholds: the gate reuses, and the reuse task uses the hook too.
    reference = str(Path(data).with_name("ref.npz"))
    dr = module.dag.test(run_conf={"model_name": "cnn", "data_uri": reference, "reuse_threshold": 0.99,
                                   "rebuild_threshold": 1.0})  # fmt: skip
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    assert states["gate"] == "success" and states["reuse"] == "success", states

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id).all()
        xcom = json.dumps([[r.task_id, r.key, r.value] for r in rows], default=str)
    assert "gate_run_id" in xcom
    task_logs = "\n".join(
        p.read_text(errors="replace")
        for p in (logs_dir.rglob("*") if logs_dir.exists() else [])
        if p.is_file() and before.get(p) != p.stat().st_mtime
    )
    places = {
        "logs": caplog.text + task_logs,
        "stdout/stderr": "".join(capfd.readouterr()),
        "xcom": xcom,
        "mlflow": everything_mlflow_holds(uri, tmp_path),
    }
    for place, text in places.items():
        assert SECRET not in text, place
    gate = [r for r in gate_runs(uri) if r.data.params.get("airflow_run_id") == dr.run_id]
    assert len(gate) == 1 and gate[0].data.tags.get(names.ACTION_TAG) == "reused"
