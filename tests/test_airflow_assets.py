"""The two-DAG pattern, run for real with dag.test(): gate -> (approval) -> asset event -> retrain DAG -> promotion.

The approval is answered through Airflow's own REST API (the public HITL endpoint, in-process with a JWT of the
configured auth manager); the timeout through the scheduler's own sweep (``check_awaiting_input_timeouts``).
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import load_dag, mlflow_conn

from resque_airflow.registry import names
from resque_airflow.registry.assets import model_asset_uri
from resque_airflow.registry.client import make_client

pytestmark = pytest.mark.airflow
MODEL = "digits-cnn"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, airflow_db, digits_cnn):
    from resque_airflow.examples import digits
    from resque_airflow.registry.publish import publish_model

    home = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{home}/mlflow.db"
    s, onnx_path, ref, cost = digits_cnn.splits, digits_cnn.onnx_path, digits_cnn.reference, digits_cnn.cost
    publish_model(
        tracking_uri=uri,
        name=MODEL,
        model_path=onnx_path,
        reference=str(ref),
        weights_path=digits_cnn.weights,
        torch_factory="resque_airflow.examples.digits:make_model",
        training_cost=cost.to_metrics(),
    )
    shifted = digits.apply_shift(s.test.x, "salt_and_pepper", 0.3, seed=1)
    return uri, digits.write_npz(home / "shifted.npz", shifted, s.test.y), home


@pytest.fixture(autouse=True)
def conn(champion, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", mlflow_conn(champion[0]))


def states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


def asset_events(uri: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        q = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri == uri)
        return [dict(e.extra) for e in s.scalars(q.order_by(AssetEvent.id))]


def _awaiting(dag_id: str, deadline: float):
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session
    from sqlalchemy import select

    while time.monotonic() < deadline:
        with create_session() as s:
            ti = s.scalars(select(TI).where(TI.dag_id == dag_id, TI.task_id == "approve",
                                            TI.state == "awaiting_input")).first()  # fmt: skip
            if ti is not None:
                return ti.run_id, ti.trigger_timeout
        time.sleep(0.5)
    raise TimeoutError("no approval task awaiting input")


def answer(dag_id: str, option: str | None, box: dict) -> threading.Thread:
    """In the background: answer the approval through the REST API, or (None) let it time out via the scheduler."""

    def work():
        try:
            run_id, timeout_at = _awaiting(dag_id, time.monotonic() + 600)
            if option is None:
                from airflow.jobs.job import Job
                from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
                from airflow.sdk import timezone

                while timezone.utcnow() <= timeout_at:
                    time.sleep(0.5)
                SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
                box["answered"] = "timeout"
                return
            from airflow.api_fastapi.app import create_app, get_auth_manager
            from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
            from fastapi.testclient import TestClient

            app = create_app()
            token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="approver", role="admin"))
            with TestClient(app) as client:
                r = client.patch(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
                                 json={"chosen_options": [option], "params_input": {}},
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            box["status"] = r.status_code
            box["answered"] = option
        except BaseException as exc:  # surfaced by the test
            box["error"] = repr(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def gate_run(uri: str, dagrun):
    client = make_client(uri)
    exp = client.get_experiment_by_name(names.DEFAULT_EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"params.airflow_run_id = '{dagrun.run_id}'")
    return run


def test_approved_retrain_emits_the_event_and_the_retrain_dag_reads_it(champion):
    uri, shifted, _ = champion
    client = make_client(uri)
    asset = model_asset_uri(MODEL)
    before = len(asset_events(asset))
    box: dict = {}
    t = answer("resque_gate_assets", "Approve", box)
    dr = load_dag("resque_gate_assets").test(run_conf={"data_uri": str(shifted), "max_cost": 0})
    t.join(5)
    assert "error" not in box, box
    st = states(dr)
    assert box["status"] == 200 and st["approve"] == "success" and st["request_retrain"] == "success", st
    run = gate_run(uri, dr)
    assert run.data.tags[names.ACTION_TAG] == "approved"
    events = asset_events(asset)
    assert len(events) == before + 1
    extra = events[-1]
    assert extra["gate_run_id"] == run.info.run_id and extra["decision"] == run.data.tags[names.DECISION_TAG]
    assert extra["model_version"] == "1" and extra["score"] == pytest.approx(run.data.metrics[names.SCORE_METRIC])
    assert len(extra["interval"]) == 2 and extra["predicted_cost"]["predicted"] > 0
    # The audit loop: named run, batch as input dataset (URI + digest), HTML report, classic-ML view.
    assert run.info.run_name.startswith(f"{MODEL}@champion {extra['decision']} ")
    (inp,) = run.inputs.dataset_inputs
    assert str(shifted) in inp.dataset.source and run.data.params["data_hash"].startswith(inp.dataset.digest)
    assert "report.html" in {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, "resque")}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    retrain = load_dag("resque_retrain").test(run_conf={"max_epochs": 2})
    rst = states(retrain)
    assert rst["train"] == "success", rst
    exp_r = client.get_experiment_by_name(names.RETRAIN_EXPERIMENT)
    (trained,) = client.search_runs([exp_r.experiment_id],
                                    filter_string=f"tags.`{names.GATE_RUN_TAG}` = '{run.info.run_id}' and "
                                    f"tags.`{names.KIND_TAG}` = '{extra['decision']}'")  # fmt: skip
    measured = client.get_run(run.info.run_id).data.metrics
    assert measured["measured_steps_to_target"] == trained.data.metrics["steps_to_target"]
    assert "predicted_steps_to_target" in measured  # predicted beside measured, on the gate run
    if trained.data.metrics["censored"] == 0:
        assert client.get_model_version_by_alias(MODEL, "challenger").run_id == trained.info.run_id
        assert rst["promote"] == "success"


@pytest.mark.parametrize("option", ["Reject", None], ids=["rejected", "timed_out"])
def test_rejected_or_timed_out_keeps_the_champion(champion, option, monkeypatch):
    uri, shifted, _ = champion
    client = make_client(uri)
    if option is None:
        monkeypatch.setenv("RESQUE_APPROVAL_HOURS", str(2 / 3600))  # two seconds
    champion_before = client.get_model_version_by_alias(MODEL, "champion").version
    versions_before = len(client.search_model_versions(f"name = '{MODEL}'"))
    asset = model_asset_uri(MODEL)
    before = len(asset_events(asset))
    box: dict = {}
    t = answer("resque_gate_assets", option, box)
    dr = load_dag("resque_gate_assets").test(run_conf={"data_uri": str(shifted), "max_cost": 0})
    t.join(5)
    assert "error" not in box, box
    st = states(dr)
    assert st["approve"] == "success" and st["request_retrain"] == "skipped", st
    assert len(asset_events(asset)) == before  # no event: the retrain DAG is not triggered
    assert gate_run(uri, dr).data.tags[names.ACTION_TAG] == ("rejected" if option else "timed_out")
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion_before
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions_before  # no challenger
