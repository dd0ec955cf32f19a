"""The example DAGs, run for real with dag.test() against a SQLite MLflow registry in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_byte, load_dag, mlflow_conn

from resque_airflow.registry import names
from resque_airflow.registry.client import make_client

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def champion(tmp_path_factory, airflow_db, digits_cnn):
    """A digits CNN trained for real, published as digits-cnn@champion with weights and training cost."""
    from resque_airflow.examples import digits
    from resque_airflow.registry.publish import publish_model

    home = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{home}/mlflow.db"
    s, onnx_path, ref, cost = digits_cnn.splits, digits_cnn.onnx_path, digits_cnn.reference, digits_cnn.cost
    for name in ("digits-cnn", "tamper-me", "costly"):
        publish_model(
            tracking_uri=uri, name=name, model_path=onnx_path, reference=str(ref), weights_path=digits_cnn.weights,
            torch_factory="resque_airflow.examples.digits:make_model", training_cost=cost.to_metrics(),
        )  # fmt: skip
    shifted = digits.apply_shift(s.test.x, "salt_and_pepper", 0.3, seed=1)
    data = {
        "clean": digits.write_npz(home / "clean.npz", s.test.x, s.test.y),
        "shifted": digits.write_npz(home / "shifted.npz", shifted, s.test.y),
    }
    shards = home / "shards"
    for i, part in enumerate(np.array_split(np.arange(len(s.test.y)), 3)):
        digits.write_npz(shards / f"part-{i}.npz", shifted[part], s.test.y[part])
    data["shards"] = shards
    return uri, data, home


@pytest.fixture(autouse=True)
def conn(champion, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", mlflow_conn(champion[0]))


def states(dagrun) -> dict[str, str]:
    return {
        (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
        for ti in dagrun.get_task_instances()
    }


def gate_run_of(uri: str, dagrun):
    client = make_client(uri)
    exp = client.get_experiment_by_name(names.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"params.airflow_run_id = '{dagrun.run_id}'")
    assert len(runs) == 1, f"expected one gate run for {dagrun.run_id}, found {len(runs)}"
    return runs[0]


def test_clean_batch_takes_reuse_and_leaves_the_audit_trail(champion):
    uri, data, _ = champion
    dr = load_dag("resque_gate").test(run_conf={"model_name": "digits-cnn", "data_uri": str(data["clean"])})
    st = states(dr)
    assert st["gate"] == "success" and st["reuse"] == "success" and st["join"] == "success"
    assert st["retrain"] == "skipped" and st["rebuild"] == "skipped"
    run = gate_run_of(uri, dr)
    assert run.data.tags[names.DECISION_TAG] == "reuse" and run.data.tags["resque.action"] == "reused"
    assert run.data.params["airflow_dag_id"] == "resque_gate" and run.data.params["airflow_task_id"] == "gate"
    assert names.SCORE_METRIC in run.data.metrics
    mv = make_client(uri).get_model_version_by_alias("digits-cnn", "champion")
    assert mv.tags[names.MV_TAG_GATE_RUN] == run.info.run_id and mv.tags[names.MV_TAG_DECISION] == "reuse"


def test_shifted_batch_does_not_reuse_and_retrain_logs_measured_cost(champion):
    uri, data, _ = champion
    dr = load_dag("resque_gate").test(
        run_conf={"model_name": "digits-cnn", "data_uri": str(data["shifted"]), "max_epochs": 2}
    )
    st = states(dr)
    run = gate_run_of(uri, dr)
    decision = run.data.tags[names.DECISION_TAG]
    assert decision in ("retrain", "rebuild") and st["reuse"] == "skipped" and st[decision] == "success"
    assert st["join"] == "success"
    client = make_client(uri)
    exp = client.get_experiment_by_name(names.RETRAIN_EXPERIMENT)
    retrain = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{names.GATE_RUN_TAG}` = '{run.info.run_id}'"
    )
    assert len(retrain) == 1
    metrics = retrain[0].data.metrics
    assert set(names.COST_METRICS) <= set(metrics) and metrics["wall_s"] > 0
    assert retrain[0].data.tags[names.KIND_TAG] == decision
    if metrics["censored"] == 0:  # met its target: it is the challenger
        assert client.get_model_version_by_alias("digits-cnn", "challenger").run_id == retrain[0].info.run_id
    else:  # missed it (a 2-epoch cap): registered, marked, and never given the alias (issue 15)
        assert retrain[0].data.tags["resque.target"] == "missed"
        versions = client.search_model_versions(f"run_id = '{retrain[0].info.run_id}'")
        assert len(versions) == 1 and not versions[0].aliases
    gate = client.get_run(run.info.run_id).data
    assert gate.metrics["measured_steps_to_target"] == metrics["steps_to_target"]  # written back beside predicted


@pytest.mark.parametrize(("thresholds", "branch"), [((0.0, 1.0), "retrain"), ((0.0, 1e-6), "rebuild")])
def test_threshold_overrides_route_every_branch(champion, thresholds, branch):
    uri, data, _ = champion
    conf = {"model_name": "digits-cnn", "data_uri": str(data["clean"]), "max_epochs": 1,
            "reuse_threshold": thresholds[0], "rebuild_threshold": thresholds[1]}  # fmt: skip
    dr = load_dag("resque_gate").test(run_conf=conf)
    st = states(dr)
    assert st[branch] == "success" and st["reuse"] == "skipped" and st["join"] == "success"
    assert json.loads(gate_run_of(uri, dr).data.tags[names.BRANCH_TAG]) == [branch]


def test_sharded_dag_fans_out_and_decides_once(champion, tmp_path):
    uri, data, _ = champion
    conf = {"model_name": "digits-cnn", "data_uri": str(data["shards"]), "summary_uri": str(tmp_path / "summaries")}
    dr = load_dag("resque_gate_sharded").test(run_conf=conf)
    st = states(dr)
    assert [st[f"score_shard[{i}]"] for i in range(3)] == ["success"] * 3
    assert st["gate"] == "success" and st["join"] == "success"
    taken = [b for b in ("reuse", "retrain", "rebuild") if st[b] == "success"]
    assert len(taken) == 1
    run = gate_run_of(uri, dr)
    assert run.data.metrics["n_samples"] == sum(len(np.load(p)["y"]) for p in data["shards"].glob("*.npz"))
    single = load_dag("resque_gate").test(
        run_conf={"model_name": "digits-cnn", "data_uri": str(data["shifted"]), "max_epochs": 1}
    )
    single_run = gate_run_of(uri, single)
    assert run.data.metrics[names.SCORE_METRIC] == pytest.approx(single_run.data.metrics[names.SCORE_METRIC], abs=1e-9)
    assert taken == [single_run.data.tags[names.DECISION_TAG]]


def test_failures_fail_the_gate_and_leave_tags_unchanged(champion, tmp_path):
    uri, data, _ = champion
    client = make_client(uri)
    dag = load_dag("resque_gate")
    dag.test(run_conf={"model_name": "tamper-me", "data_uri": str(data["clean"])})
    before = dict(client.get_model_version("tamper-me", "1").tags)
    (tmp_path / "broken.npz").write_bytes(b"\x00not a numpy file")
    cases = [
        {"model_name": "no-such-model", "data_uri": str(data["clean"])},
        {"model_name": "tamper-me", "data_uri": str(tmp_path / "broken.npz")},
        {"model_name": "tamper-me", "data_uri": str(tmp_path / "missing.npz")},
    ]
    for conf in cases:
        st = states(dag.test(run_conf=conf))
        assert st["gate"] == "failed", conf
        assert {st["reuse"], st["retrain"], st["rebuild"]} == {"upstream_failed"}
    model_file = f"{client.get_model_version_download_uri('tamper-me', '1')}/model.onnx"
    flip_byte(model_file, -20)
    st = states(dag.test(run_conf={"model_name": "tamper-me", "data_uri": str(data["clean"])}))
    assert st["gate"] == "failed"
    assert dict(client.get_model_version("tamper-me", "1").tags) == before


def test_cost_aware_decision_narrows_with_history(champion):
    """A fresh model's forecast comes from the shipped prior; its own retrain history corrects and narrows it."""
    from mlflow.entities import Metric

    from resque_airflow.registry.client import ensure_experiment

    uri, data, home = champion
    client = make_client(uri)
    conf = {"model_name": "costly", "data_uri": str(data["shifted"]), "max_epochs": 1}
    dag = load_dag("resque_gate")
    first = gate_run_of(uri, dag.test(run_conf=conf))
    assert first.data.tags[names.POLICY_TAG].startswith("calibrated")
    m0 = first.data.metrics
    assert (
        m0["predicted_steps_to_target_low"] <= m0["predicted_steps_to_target"] <= m0["predicted_steps_to_target_high"]
    )
    gate_exp = ensure_experiment(client, names.DEFAULT_EXPERIMENT)
    retrain_exp = ensure_experiment(client, names.RETRAIN_EXPERIMENT)
    rng = np.random.default_rng(0)
    for _ in range(12):  # a history of past gates and what the retraining each triggered really cost
        signals = {"excess": rng.uniform(1, 6), "accuracy_drop_relative": rng.uniform(0, 0.5)}
        gate = client.create_run(gate_exp, tags={names.KIND_TAG: names.KIND_GATE, names.MODEL_NAME_TAG: "costly"})
        client.log_batch(gate.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in signals.items()])
        steps = m0["rebuild_cost"] * 0.1 * rng.uniform(0.9, 1.1)  # fine-tuning always took ~10% of a rebuild
        tags = {
            names.KIND_TAG: names.KIND_RETRAIN,
            names.MODEL_NAME_TAG: "costly",
            names.GATE_RUN_TAG: gate.info.run_id,
        }
        run = client.create_run(retrain_exp, tags=tags)
        client.log_batch(
            run.info.run_id, metrics=[Metric("steps_to_target", steps, 0, 0), Metric("censored", 0.0, 0, 0)]
        )
    dr = dag.test(run_conf=conf)
    run = gate_run_of(uri, dr)
    m = run.data.metrics
    result = json.loads(
        Path(client.download_artifacts(run.info.run_id, names.GATE_RESULT_ARTIFACT, str(home))).read_text()
    )
    assert result["prediction"]["basis"] == "prior+history" and result["prediction"]["n_history"] == 12
    assert "predicted fine-tuning" in run.data.tags[names.REASON_TAG]
    width0 = m0["predicted_steps_to_target_high"] - m0["predicted_steps_to_target_low"]
    width = m["predicted_steps_to_target_high"] - m["predicted_steps_to_target_low"]
    assert width < width0  # twelve runs of consistent history narrow the prior's interval
    rel0, rel = (x["predicted_steps_to_target"] / x["rebuild_cost"] for x in (m0, m))
    assert abs(rel - 0.1) <= abs(rel0 - 0.1) + 1e-9  # and pulled towards what this model's retraining really cost
    decision = run.data.tags[names.DECISION_TAG]
    assert states(dr)[decision] == "success"


def test_accuracy_guard_overrides_a_low_score(champion):
    """With labels, a model below its retrain target is never reused, however low RESQUE scores."""
    uri, data, _ = champion
    dag = load_dag("resque_gate")
    lenient = {"reuse_threshold": 0.99, "rebuild_threshold": 1.0, "max_epochs": 1}  # RESQUE alone says reuse
    shifted = dag.test(run_conf={"model_name": "digits-cnn", "data_uri": str(data["shifted"]), **lenient})
    run = gate_run_of(uri, shifted)
    accuracy_drop = run.data.metrics["acc_drop"]
    reference_accuracy = (
        make_client(uri)
        .get_run(make_client(uri).get_model_version_by_alias("digits-cnn", "champion").run_id)
        .data.metrics["reference_accuracy"]
    )
    assert reference_accuracy - accuracy_drop < 0.95 * reference_accuracy  # the batch really is below target
    assert run.data.tags[names.DECISION_TAG] == "retrain" and run.data.params["policy"] == "thresholds+accuracy"
    assert states(shifted)["retrain"] == "success" and states(shifted)["reuse"] == "skipped"
    clean = dag.test(run_conf={"model_name": "digits-cnn", "data_uri": str(data["clean"]), **lenient})
    assert gate_run_of(uri, clean).data.tags[names.DECISION_TAG] == "reuse"
