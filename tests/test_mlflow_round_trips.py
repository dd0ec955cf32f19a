"""MLflow round trips of a real gate: an upper bound on the MlflowClient calls of one ``run_gate`` (issue 16).

Counted as ``benchmarks/fixed_costs.py`` counts them: every public method of :class:`mlflow.MlflowClient` wrapped,
calls MLflow makes to its own public methods included (its "is this model a prompt?" ``get_registered_model``).
A count, never a time: each call is a round trip to a tracking server.
"""

from __future__ import annotations

import inspect
import types
from collections import Counter

import numpy as np
import pytest
from conftest import make_images

from resque_airflow.registry import names
from resque_airflow.registry.client import ensure_experiment, make_client
from resque_airflow.registry.gate import GateRequest, Origin, run_gate
from resque_airflow.registry.report import REPORT_ARTIFACT

# Measured on SQLite: 33 calls per first gate before issue 16 (34 in benchmarks/fixed_costs.py), 20 after.
FIRST_GATE_MAX = 20  # the experiment is created; six model-version tags are new
RETRY_GATE_MAX = 20  # as a retry of a task instance: one search for the earlier try, one delete; fewer tags change
FAILED_GATE_MAX = 7  # resolve (3), experiment, run, one batch of failure marks and params, close


@pytest.fixture(scope="module")
def registry(cnn_registry):
    uri, root = cnn_registry("round-trips")
    for name, x in (("new", make_images(200, seed=2, shift=0.5)[0]), ("nan", np.full((50, 1, 8, 8), np.nan))):
        np.savez(root / f"{name}.npz", x=x.astype(np.float32), y=np.arange(len(x)) % 4)
    return uri, root


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The names of the MlflowClient methods called, in order (nested calls included)."""
    from mlflow import MlflowClient

    seen: list[str] = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name in dir(MlflowClient):
        if not name.startswith("_") and isinstance(inspect.getattr_static(MlflowClient, name), types.FunctionType):
            monkeypatch.setattr(MlflowClient, name, counted(name, getattr(MlflowClient, name)))
    return seen


def _gate(uri, root, data="new", origin=None):
    return run_gate(GateRequest("models:/cnn@champion", str(root / f"{data}.npz")), client=make_client(uri),
                    origin=origin)  # fmt: skip


def test_a_gate_makes_few_mlflow_calls(registry, calls):
    from mlflow import MlflowClient

    uri, root = registry
    outcome = _gate(uri, root)
    first = Counter(calls)
    assert len(calls) <= FIRST_GATE_MAX, first
    assert first["get_registered_model"] <= 1, first  # read once per gate, not before every registry call
    assert first["log_batch"] == 1 and first["log_artifacts"] == 1, first  # one batch, one upload
    assert not {"log_artifact", "log_dict", "log_text", "set_tag", "update_run", "log_param"} & set(first), first
    assert first["get_model_version"] <= 1, first  # the verifying read; the first round uses the resolved version

    calls.clear()
    retry = Origin("round_trips", "manual__1", "gate", 2)
    again = _gate(uri, root, origin=retry)
    second = Counter(calls)
    assert len(calls) <= RETRY_GATE_MAX, second
    assert second["set_model_version_tag"] <= 4, second  # only the tags that change: score, run id, time, JSON
    assert "create_experiment" not in second, second

    # What the fewer calls wrote is what the gate always wrote.
    client = MlflowClient(uri)
    run = client.get_run(again.gate_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.STATUS_TAG] == names.STATUS_DECIDED
    assert run.info.run_name.startswith("cnn@champion ") and run.data.params["airflow_try_number"] == "2"
    assert set(names.GATE_PARAMS) <= set(run.data.params) and names.SCORE_METRIC in run.data.metrics
    assert {a.path for a in client.list_artifacts(again.gate_run_id, "resque")} == {
        names.GATE_RESULT_ARTIFACT, REPORT_ARTIFACT,
    }  # fmt: skip
    tags = client.get_model_version("cnn", outcome.model_version).tags
    assert tags[names.MV_TAG_GATE_RUN] == again.gate_run_id


def test_a_failed_gate_makes_few_calls_and_leaves_no_run_running(registry, calls):
    from mlflow import MlflowClient

    uri, root = registry
    ensure_experiment(make_client(uri), names.DEFAULT_EXPERIMENT)  # as after any earlier gate
    before = dict(MlflowClient(uri).get_model_version("cnn", "1").tags)
    calls.clear()
    with pytest.raises(Exception, match="NaN"):
        _gate(uri, root, data="nan")
    assert len(calls) <= FAILED_GATE_MAX, Counter(calls)
    assert "set_model_version_tag" not in calls
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == names.DEFAULT_EXPERIMENT]
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    assert run.info.status == "FAILED" and run.data.tags[names.STATUS_TAG] == names.STATUS_FAILED
    assert run.data.params["data_uri"].endswith("nan.npz")  # the request's params go with the failure marks
    assert dict(client.get_model_version("cnn", "1").tags) == before
