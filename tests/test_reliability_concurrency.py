"""Reliability catalogue, part 3: concurrency (docs/RELIABILITY.md, section "Concurrency").

The model-version tags are several MLflow calls with no transaction and no compare-and-set, so two gates tagging
the same version can interleave. ``registry/tags.py`` writes, then verifies against the newest decided gate run
until the tags agree (see ``tag_model_version``). These tests pin that down: a deterministic lost-update schedule
(threads, SQLite), a tagging cut short halfway, and eight ``resque gate`` processes at once against one
``mlflow server``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images
from test_reliability_support import MlflowServer, check_tags_name, gate_runs, mv_tags, newest_gate

from resque_airflow.errors import RegistryError
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate
from resque_airflow.registry.publish import publish_model

WAIT_S = 120  # bound on every wait for another thread or process


@pytest.fixture(scope="module")
def registry(cnn_registry):
    """A SQLite registry with one model per test (``lost``, ``cut``, ``race``), so the tests share one database."""
    uri, root = cnn_registry("concurrency", ("lost", "cut", "race"))
    data = []
    for i, shift in enumerate((0.0, 0.4, 0.8)):
        xs, ys = make_images(120, seed=20 + i, shift=shift)
        np.savez(root / f"new{i}.npz", x=xs, y=ys)
        data.append(str(root / f"new{i}.npz"))
    return uri, data


def runs_of(uri: str, model: str) -> list:
    return [r for r in gate_runs(uri) if r.data.tags[names.MODEL_NAME_TAG] == model]


def test_older_gate_that_writes_last_does_not_win(registry, monkeypatch):
    """The lost update: gate A decides first, stalls before its tag writes, gate B decides and tags, A writes.

    A plain "read, compare with the newest, write" lets A (older) overwrite B. Here A, after writing, finds B's
    newer decided run and puts B's result back: the tags name B, and agree with one another.
    """
    from mlflow import MlflowClient

    uri, data = registry
    a_stalled, release = threading.Event(), threading.Event()
    real_set = MlflowClient.set_model_version_tag

    def set_tag(self, *args, **kwargs):
        if threading.current_thread().name == "gate-A" and not release.is_set():
            a_stalled.set()
            release.wait(WAIT_S)
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", set_tag)
    outcome: dict = {}

    def gate_a():
        try:
            outcome["A"] = run_gate(GateRequest("models:/lost@champion", data[0]), client=make_client(uri))
        except BaseException as exc:  # handed to the main thread
            outcome["A"] = exc

    thread = threading.Thread(target=gate_a, name="gate-A")
    thread.start()
    try:
        assert a_stalled.wait(WAIT_S), "gate A never reached its tag writes"
        b = run_gate(GateRequest("models:/lost@champion", data[1]), client=make_client(uri))
    finally:
        release.set()
        thread.join(WAIT_S)
    a = outcome["A"]
    assert not isinstance(a, BaseException), a
    runs = {r.info.run_id: r for r in runs_of(uri, "lost")}
    assert runs[a.gate_run_id].info.end_time < runs[b.gate_run_id].info.end_time  # A is the older gate
    tags = mv_tags(uri, "lost")
    assert tags[names.MV_TAG_GATE_RUN] == b.gate_run_id
    check_tags_name(tags, runs[b.gate_run_id])


def test_tagging_cut_short_is_repaired_by_the_next_gate(registry, monkeypatch):
    """The registry fails after two of the six tag writes: the gate reports it, the next gate leaves all consistent."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, data = registry
    first = run_gate(GateRequest("models:/cut@champion", data[0]), client=make_client(uri))
    real_set = MlflowClient.set_model_version_tag
    calls = {"n": 0}

    def failing_set(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise MlflowException("API request failed: connection refused (simulated)")
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", failing_set)
    with pytest.raises(RegistryError, match="tagging the model version failed"):
        run_gate(GateRequest("models:/cut@champion", data[2]), client=make_client(uri))
    half = mv_tags(uri, "cut")
    assert json.loads(half["resque.last_gate"])["run_id"] == first.gate_run_id  # the authoritative tag is intact
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", real_set)
    last = run_gate(GateRequest("models:/cut@champion", data[1]), client=make_client(uri))
    runs = runs_of(uri, "cut")
    assert len(runs) == 3 and all(r.data.tags[names.STATUS_TAG] == "decided" for r in runs)
    assert newest_gate(runs).info.run_id == last.gate_run_id
    check_tags_name(mv_tags(uri, "cut"), newest_gate(runs))


def test_two_gates_inserting_the_same_tag_is_a_lost_race_not_an_error(registry, monkeypatch):
    """MLflow's SQL store sets a tag as "look up, then insert": two gates inserting a tag neither saw both insert,
    and one gets a UNIQUE-constraint error (an HTTP 400 from a server, not retried). Seen with eight parallel
    gates; replayed here with the store's own message: the gate re-reads, verifies, and succeeds."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, data = registry
    real_set = MlflowClient.set_model_version_tag
    raised = []

    def set_tag(self, name, version, key, value, stage=None):
        if not raised:  # the other gate inserted this tag first, and with its own value
            real_set(self, name, version, key, "written by another gate")
            raised.append(key)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.workspace, "
                "model_version_tags.key, model_version_tags.name, model_version_tags.version",
                error_code="BAD_REQUEST",
            )
        return real_set(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", set_tag)
    outcome = run_gate(GateRequest("models:/race@champion", data[0]), client=make_client(uri))
    assert raised
    runs = {r.info.run_id: r for r in runs_of(uri, "race")}
    check_tags_name(mv_tags(uri, "race"), runs[outcome.gate_run_id])


def test_two_gates_setting_the_experiment_view_is_a_lost_race_not_an_error(registry, monkeypatch):
    """The same "look up, then insert" race on the experiment's view tag (``mlflow.experimentKind``): seen in CI with
    eight parallel gates on an experiment another gate had just created. The view is set once, at creation, and a
    duplicate insert by a concurrent gate is accepted once the tag reads back."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, data = registry
    MlflowClient(uri).create_experiment("untagged-view")  # as an older gate (or a user) created it: no view tag
    real_set = MlflowClient.set_experiment_tag
    raised = []

    def set_tag(self, experiment_id, key, value):
        if not raised:  # the other gate inserted the tag first
            real_set(self, experiment_id, key, value)
            raised.append(key)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id",
                error_code="BAD_REQUEST",
            )
        return real_set(self, experiment_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", set_tag)
    outcome = run_gate(GateRequest("models:/race@champion", data[0], experiment_name="untagged-view"),
                       client=make_client(uri))  # fmt: skip
    assert raised == [names.EXPERIMENT_KIND_TAG] and outcome.decision
    exp = MlflowClient(uri).get_experiment_by_name("untagged-view")
    assert exp.tags[names.EXPERIMENT_KIND_TAG] == names.EXPERIMENT_KIND_ML


def test_mapped_gate_with_map_index_0_keeps_its_own_key(registry, monkeypatch):
    """Map index 0 is a map index: its gate run key must not read as an unmapped task's (-1)."""
    from conftest import mlflow_conn
    from test_reliability_support import FakeTI, operator_gate

    uri, data = registry
    monkeypatch.setenv("AIRFLOW_CONN_RELIABILITY_MAPPED", mlflow_conn(uri))
    operator_gate("reliability_mapped", FakeTI(run_id="mapped", map_index=0), model_name="race", data=data[0])
    operator_gate("reliability_mapped", FakeTI(run_id="mapped", map_index=1), model_name="race", data=data[1])
    keys = {r.data.tags.get(names.GATE_KEY_TAG) for r in runs_of(uri, "race")}
    assert "reliability/mapped/gate/0" in keys and "reliability/mapped/gate/1" in keys
    assert "reliability/mapped/gate/-1" not in keys


@pytest.mark.server
def test_parallel_gates_on_one_server_lose_nothing(tmp_path, cnn_onnx):
    """Eight `resque gate` processes at once, five on one model and three on another, against one mlflow server.

    Each prints exactly one JSON object on stdout (MLflow's "View run" lines would break ``--json``).
    """
    server = MlflowServer(tmp_path / "server").start()
    try:
        x, y = make_images(300, seed=1)
        np.savez(tmp_path / "ref.npz", x=x, y=y)
        for model in ("cnn-a", "cnn-b"):
            publish_model(
                tracking_uri=server.uri, name=model, model_path=cnn_onnx[1], reference=str(tmp_path / "ref.npz")
            )
        jobs = []
        for i in range(8):
            model = "cnn-a" if i < 5 else "cnn-b"
            xi, yi = make_images(100, seed=100 + i, shift=0.1 * i)
            path = tmp_path / f"new{i}.npz"
            np.savez(path, x=xi, y=yi)
            jobs.append((model, path))
        exe = str(Path(sys.executable).with_name("resque"))
        procs = []
        for model, path in jobs:
            cmd = [exe, "gate", "--model-uri", f"models:/{model}@champion", "--data", str(path), "--tracking-uri",
                   server.uri, "--json"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=WAIT_S * 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out))

        # Every gate recorded: one FINISHED, decided run each, with its metrics and result artifact.
        from resque_airflow.registry.client import make_client

        client = make_client(server.uri)
        runs = {r.info.run_id: r for r in gate_runs(server.uri)}
        assert set(runs) == {r["gate_run_id"] for r in results} and len(runs) == len(jobs)
        for result in results:
            run = runs[result["gate_run_id"]]
            assert run.info.status == "FINISHED" and run.data.tags[names.STATUS_TAG] == "decided"
            assert run.data.metrics[names.SCORE_METRIC] == result["score"]
            assert run.data.tags[names.MODEL_NAME_TAG] == result["model_name"]
            stored = client.download_artifacts(run.info.run_id, names.GATE_RESULT_ARTIFACT, str(tmp_path))
            assert json.loads(Path(stored).read_text())["gate_run_id"] == run.info.run_id
        # The tags of each version name its newest gate, and agree with one another.
        for model, n in (("cnn-a", 5), ("cnn-b", 3)):
            mine = [r for r in runs.values() if r.data.tags[names.MODEL_NAME_TAG] == model]
            assert len(mine) == n
            check_tags_name(mv_tags(server.uri, model), newest_gate(mine))
    finally:
        server.stop()
