"""The audit trail read back from a real SQLite MLflow registry: history, detail, table, JSON and ``resque audit``."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from resque_airflow.registry import audit, audit_report, names

MODEL = "resnet-cifar"
OTHER_MODEL = "intent-bert"
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
N_CLASSES = 10

# (version, score, decision, branch, status, label_source, predicted epochs (value, low, high) or None, per-class)
GATES: list[dict[str, Any]] = [
    {"version": "1", "score": 0.012, "decision": "reuse", "branch": "reuse", "label_source": "given"},
    {
        "version": "1",
        "score": 0.085,
        "decision": "retrain",
        "branch": "retrain",
        "label_source": "given",
        "predicted": {"epochs_to_target": (12.0, 8.0, 16.0), "wall_s": (300.0, 200.0, 420.0)},
    },
    {"version": "2", "score": 0.31, "decision": "rebuild", "branch": "rebuild", "label_source": "predicted"},
    {"version": "2", "score": None, "decision": None, "branch": None, "label_source": "none", "status": "failed"},
    {
        "version": "2",
        "score": 0.015,
        "decision": "reuse",
        "branch": "<img src=x onerror=alert(1)>",
        "label_source": "none",
    },
]
# Two calibrated gates (issue 11) with the default thresholds logged (reuse 0.0123, rebuild 1.0) but not used.
REASON = (
    "shift detected (RESQUE 0.031, null p99 0.012 at n=4,000); estimated accuracy 0.88 < target 0.91; predicted "
    "fine-tuning 40-90 steps, below the rebuild cost 400 steps -> retrain"
)
GATES += [
    {
        "version": "2",
        "score": 0.031,
        "decision": "retrain",
        "branch": "retrain",
        "label_source": "given",
        "calibrated": {
            "interval": (0.024, 0.039), "null_quantile": 0.012, "p_value": 0.001, "shift_detected": True,
            "accuracy_measured": (0.87, 0.84, 0.90), "accuracy_estimated": (0.88, 0.85, 0.91), "reason": REASON,
            "prediction": (60.0, 40.0, 90.0), "basis": "prior", "n_history": 0, "measured_back": 72.0,
        },
    },
    {
        "version": "2",
        "score": 0.022,
        "decision": "retrain",
        "branch": "retrain",
        "label_source": "given",
        "calibrated": {
            "interval": (0.017, 0.028), "null_quantile": 0.013, "p_value": 0.004, "shift_detected": True,
            "accuracy_measured": None, "accuracy_estimated": (0.89, 0.86, 0.92), "reason": "shift detected -> retrain",
            "prediction": (30.0, 20.0, 50.0), "basis": "prior+history", "n_history": 1, "measured_back": 55.0,
        },
    },
]  # fmt: skip
CAL = (5, 6)  # indices of the calibrated gates
RETRAIN_COST = {"epochs_to_target": 14.0, "wall_s": 351.5, "energy_kwh": 0.042, "emissions_kg": 0.011}


def per_class_angles(i: int) -> dict[str, float]:
    """Per-class angles of gate ``i`` as the gate writes them (class index as a string -> angle in [0, 1])."""
    return {str(k): round(0.01 + 0.02 * k + 0.05 * i, 4) for k in range(N_CLASSES)}


def calibrated_metrics(cal: dict[str, Any], ts: int) -> list:
    """The calibrated gate's metrics, as ``registry.record.gate_metrics`` and the audit loop's write-back name them."""
    from mlflow.entities import Metric

    values = {
        "resque_score_low": cal["interval"][0], "resque_score_high": cal["interval"][1],
        "null_quantile": cal["null_quantile"], "p_value": cal["p_value"],
        "shift_detected": float(cal["shift_detected"]),
        "predicted_steps_to_target": cal["prediction"][0], "predicted_steps_to_target_low": cal["prediction"][1],
        "predicted_steps_to_target_high": cal["prediction"][2], "rebuild_cost": 400.0,
        "measured_steps_to_target": cal["measured_back"], "measured_censored": 0.0,
    }  # fmt: skip
    for name in ("accuracy_measured", "accuracy_estimated"):
        if cal[name]:
            values |= dict(zip((name, f"{name}_low", f"{name}_high"), cal[name], strict=True))
    return [Metric(k, v, ts, 0) for k, v in values.items()]


def calibrated_result(cal: dict[str, Any]) -> dict[str, Any]:
    """The calibrated fields of ``gate_result.json`` (``GateOutcome.to_dict()``)."""

    def acc(a):
        return None if a is None else dict(zip(("value", "low", "high"), a, strict=True))

    return {
        "interval": list(cal["interval"]),
        "reason": cal["reason"],
        "calibration": {
            "detection": {"null_quantile": cal["null_quantile"], "p_value": cal["p_value"], "alpha": 0.01,
                          "detected": cal["shift_detected"]},
            "accuracy_measured": acc(cal["accuracy_measured"]),
            "accuracy_estimated": acc(cal["accuracy_estimated"]),
        },
        "prediction": {"cost_metric": "steps_to_target", "predicted": cal["prediction"][0], "low": cal["prediction"][1],
                       "high": cal["prediction"][2], "rebuild_cost": 400.0, "unit": "steps", "basis": cal["basis"],
                       "n_history": cal["n_history"], "energy_kwh": None},
    }  # fmt: skip


def build_gate_registry(root: Path) -> dict[str, Any]:
    """A SQLite MLflow registry in ``root`` with gate runs written with exactly the names of ``names.py``.

    Returns the tracking URI, the gate run ids (in GATES order), the retrain run id and the other model's run id.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    artifacts = (root / "artifacts").resolve()
    gate_exp = client.create_experiment(names.DEFAULT_EXPERIMENT, artifact_location=(artifacts / "gate").as_uri())
    retrain_exp = client.create_experiment(names.RETRAIN_EXPERIMENT, artifact_location=(artifacts / "retrain").as_uri())
    model_exp = client.create_experiment("models", artifact_location=(artifacts / "models").as_uri())

    # The registered model and two versions (their source runs hold a placeholder artifact).
    client.create_registered_model(MODEL)
    for version in ("1", "2"):
        src = client.create_run(model_exp, tags={names.KIND_TAG: names.KIND_TRAIN})
        client.log_text(src.info.run_id, "placeholder", "model/MLmodel")
        client.set_terminated(src.info.run_id)
        mv = client.create_model_version(MODEL, f"runs:/{src.info.run_id}/model", run_id=src.info.run_id)
        assert str(mv.version) == version

    gate_ids = []
    for i, gate in enumerate(GATES):
        start = T0_MS + i * DAY_MS
        run = client.create_run(gate_exp, start_time=start, run_name=f"gate-{i}")
        rid = run.info.run_id
        params = {
            "model_name": MODEL,
            "model_version": gate["version"],
            "model_alias": "champion",
            "model_sha256": "ab" * 32,
            "data_uri": f"s3://bucket/batch-{i}.parquet",
            "data_hash": f"{i:064x}",
            "mode": "dist",
            "layer": "/layer4/layer4.1/conv2/Conv_output_0",
            "label_source": gate["label_source"],
            "provider": "CPUExecutionProvider",
            "n_samples": "4000",
            "n_classes": str(N_CLASSES),
            "reuse_threshold": "0.0123" if "calibrated" in gate else "0.02",
            "rebuild_threshold": "1.0" if "calibrated" in gate else "0.2",
            "policy": "calibrated+cost" if "calibrated" in gate else "thresholds",
            "airflow_dag_id": "resque_gate",
            "airflow_run_id": f"scheduled__2026-01-0{i + 1}",
            "airflow_task_id": "gate",
            "airflow_try_number": "1",
        }
        assert set(params) == set(names.GATE_PARAMS)
        tags = {
            names.KIND_TAG: names.KIND_GATE,
            names.GATE_KEY_TAG: f"resque_gate/scheduled__2026-01-0{i + 1}/gate/-1",
            names.STATUS_TAG: gate.get("status", "decided"),
            names.MODEL_NAME_TAG: MODEL,
            names.MODEL_VERSION_TAG: gate["version"],
        }
        if gate["decision"]:
            tags[names.DECISION_TAG] = gate["decision"]
            tags[names.BRANCH_TAG] = json.dumps([gate["branch"]])  # as the gate writes it: a JSON list of task ids
        if gate.get("status") == "failed":
            tags["resque.error"] = "ResqueInputError: data_uri: no such file"
        metrics = []
        if gate["score"] is not None:
            metrics.append(Metric(names.SCORE_METRIC, gate["score"], start + 1000, 0))
            metrics.append(Metric("resque_dist", gate["score"], start + 1000, 0))
            metrics.append(Metric("mmd", 0.5 * gate["score"], start + 1000, 0))
            metrics.append(Metric("confidence_drop", float("nan"), start + 1000, 0))  # NaN must not break JSON
            metrics += [Metric(f"angle_class_{k}", v, start + 1000, 0) for k, v in per_class_angles(i).items()]
        for cost, (value, low, high) in gate.get("predicted", {}).items():
            metrics += [
                Metric(f"predicted_{cost}", value, start + 1000, 0),
                Metric(f"predicted_{cost}_low", low, start + 1000, 0),
                Metric(f"predicted_{cost}_high", high, start + 1000, 0),
            ]
        cal = gate.get("calibrated")
        if cal:
            metrics += calibrated_metrics(cal, start + 1000)
            tags[names.REASON_TAG] = cal["reason"]
            tags["resque.challenger_run_id"] = f"challenger-of-{i}"
            tags["resque.challenger_outcome"] = "met_target" if i == 5 else "missed_target"
        client.log_batch(
            rid,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        if gate["score"] is not None and i != 2:  # gate 2: angles only as metrics (artifact lost)
            result = {
                "score": gate["score"],
                "decision": gate["decision"],
                "per_class": per_class_angles(i),
                "classes_compared": list(range(N_CLASSES)),
                "classes_missing": [],
            }
            if cal:
                result |= calibrated_result(cal)
            client.log_text(rid, json.dumps(result), names.GATE_RESULT_ARTIFACT)
        client.set_terminated(rid, status="FAILED" if gate.get("status") == "failed" else "FINISHED")
        gate_ids.append(rid)
        if gate["decision"]:
            client.set_model_version_tag(MODEL, gate["version"], names.MV_TAG_SCORE, str(gate["score"]))
            client.set_model_version_tag(MODEL, gate["version"], names.MV_TAG_DECISION, gate["decision"])
            client.set_model_version_tag(MODEL, gate["version"], names.MV_TAG_GATE_RUN, rid)

    # The retraining that gate 1 triggered, in another experiment.
    retrain = client.create_run(
        retrain_exp,
        start_time=T0_MS + DAY_MS + 3_600_000,
        tags={names.KIND_TAG: names.KIND_RETRAIN, names.GATE_RUN_TAG: gate_ids[1], names.SOURCE_VERSION_TAG: "1"},
    )
    client.log_batch(
        retrain.info.run_id,
        metrics=[Metric(k, v, T0_MS + 2 * DAY_MS, 0) for k, v in RETRAIN_COST.items()]
        + [Metric(names.CENSORED_METRIC, 0.0, T0_MS + 2 * DAY_MS, 0)],
    )
    client.set_terminated(retrain.info.run_id)
    challenger = client.create_run(
        retrain_exp,
        start_time=T0_MS + 5 * DAY_MS + 3_600_000,
        tags={names.KIND_TAG: names.KIND_RETRAIN, names.GATE_RUN_TAG: gate_ids[5], names.SOURCE_VERSION_TAG: "2"},
    )
    client.log_metric(challenger.info.run_id, "steps_to_target", 72.0)
    client.set_terminated(challenger.info.run_id)

    # Another model with one gate run, and a non-gate run in the gate experiment that must be ignored.
    other = client.create_run(
        gate_exp,
        start_time=T0_MS,
        tags={names.KIND_TAG: names.KIND_GATE, names.MODEL_NAME_TAG: OTHER_MODEL, names.DECISION_TAG: "reuse"},
    )
    client.log_metric(other.info.run_id, names.SCORE_METRIC, 0.001)
    client.set_terminated(other.info.run_id)
    stray = client.create_run(gate_exp, tags={names.MODEL_NAME_TAG: MODEL})
    client.set_terminated(stray.info.run_id)
    return {"uri": uri, "gate_ids": gate_ids, "retrain_id": retrain.info.run_id, "other_id": other.info.run_id}


_SHARED: dict[str, dict[str, Any]] = {}


def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One registry per test session, shared with ``test_ui_browser`` (building one takes ~5-10 s). Read-only use."""
    if "registry" not in _SHARED:
        _SHARED["registry"] = build_gate_registry(tmp_path_factory.mktemp("ui-registry"))
    return _SHARED["registry"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def client(registry: dict[str, Any]):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])


def test_models_with_gates(client) -> None:
    assert audit.models_with_gates(client) == sorted([MODEL, OTHER_MODEL])
    assert audit.models_with_gates(client, experiment_names=None) == sorted([MODEL, OTHER_MODEL])
    assert audit.models_with_gates(client, experiment_names=("no-such-experiment",)) == []


def test_gate_history_records(client, registry: dict[str, Any]) -> None:
    records = audit.gate_history(client, MODEL, mlflow_ui_base="http://mlflow.example:5000/")
    assert [r.run_id for r in records] == registry["gate_ids"]  # oldest first, stray run left out
    assert [r.score for r in records] == [g["score"] for g in GATES]
    assert [r.decision for r in records] == [g["decision"] for g in GATES]
    assert [r.model_version for r in records] == [g["version"] for g in GATES]
    assert records[4].branch == GATES[4]["branch"]
    assert records[3].status == "failed" and records[3].run_status == "FAILED"
    assert records[0].start_time == "2026-01-01T00:00:00+00:00"
    first = records[0]
    assert first.thresholds == {"reuse": 0.02, "rebuild": 0.2}
    assert (first.mode, first.label_source, first.provider, first.n_samples, first.n_classes) == (
        "dist",
        "given",
        "CPUExecutionProvider",
        4000,
        N_CLASSES,
    )
    assert first.airflow == {
        "dag_id": "resque_gate",
        "run_id": "scheduled__2026-01-01",
        "task_id": "gate",
        "try_number": "1",
    }
    assert first.signals == {"resque_dist": 0.012, "mmd": 0.006, "confidence_drop": None}
    assert first.per_class is None  # loaded lazily by gate_detail
    exp_id = first.experiment_id
    assert first.mlflow_url == f"http://mlflow.example:5000/#/experiments/{exp_id}/runs/{first.run_id}"

    retrained = records[1]
    assert retrained.predicted_cost == {
        "epochs_to_target": {"value": 12.0, "low": 8.0, "high": 16.0},
        "wall_s": {"value": 300.0, "low": 200.0, "high": 420.0},
    }
    assert len(retrained.measured) == 1
    measured = retrained.measured[0]
    assert measured.run_id == registry["retrain_id"]
    assert measured.kind == names.KIND_RETRAIN
    assert measured.metrics == RETRAIN_COST
    assert measured.censored is False
    rows = {row["metric"]: row for row in retrained.cost_comparison()}
    assert rows["epochs_to_target"] == {
        "metric": "epochs_to_target",
        "predicted": 12.0,
        "low": 8.0,
        "high": 16.0,
        "measured": 14.0,
    }
    assert rows["energy_kwh"]["predicted"] is None and rows["energy_kwh"]["measured"] == 0.042
    assert audit_report.cost_cell(retrained) == "epochs_to_target 12 [8-16] / 14"
    assert all(not r.measured for i, r in enumerate(records) if i not in (1, 5))
    assert audit_report.cost_cell(records[0]) == "-"


def test_gate_history_limits_and_unknowns(client, registry: dict[str, Any]) -> None:
    last_two = audit.gate_history(client, MODEL, max_runs=2)
    assert [r.run_id for r in last_two] == registry["gate_ids"][-2:]
    assert audit.gate_history(client, "no-such-model") == []
    assert audit.gate_history(client, MODEL, experiment_names=("no-such-experiment",)) == []
    # Without a UI base and with an sqlite tracking URI there is no link to make.
    assert audit.gate_history(client, OTHER_MODEL, mlflow_ui_base="")[0].mlflow_url is None


def test_gate_detail(client, registry: dict[str, Any]) -> None:
    rid = registry["gate_ids"][1]
    detail = audit.gate_detail(client, rid)
    assert detail.run_id == rid and detail.score == GATES[1]["score"]
    assert [c["class"] for c in detail.per_class] == [str(k) for k in range(N_CLASSES)]
    assert [c["angle"] for c in detail.per_class] == list(per_class_angles(1).values())
    assert detail.classes_missing == []
    assert detail.measured[0].metrics["epochs_to_target"] == 14.0
    # Without the artifact, the angles come from the angle_class_<k> metrics; without either, the reason is given.
    from_metrics = audit.gate_detail(client, registry["gate_ids"][2])
    assert [c["angle"] for c in from_metrics.per_class] == list(per_class_angles(2).values())
    failed = audit.gate_detail(client, registry["gate_ids"][3])
    assert failed.per_class is None and "gate_result.json" in failed.detail_error
    assert failed.error == "ResqueInputError: data_uri: no such file"
    with pytest.raises(LookupError):
        audit.gate_detail(client, registry["retrain_id"])  # not a gate run
    with pytest.raises(LookupError):
        audit.gate_detail(client, "0" * 32)


def test_to_json_and_table(client) -> None:
    records = audit.gate_history(client, MODEL)
    data = json.loads(audit_report.to_json(records))
    assert [d["run_id"] for d in data] == [r.run_id for r in records]
    assert data[1]["measured"][0]["metrics"]["wall_s"] == 351.5
    assert data[1]["cost_comparison"][0]["metric"] == "epochs_to_target"
    assert data[0]["signals"]["confidence_drop"] is None
    assert data[0]["thresholds"] == {"reuse": 0.02, "rebuild": 0.2}

    text = audit_report.format_table(records, width=250)
    assert f"RESQUE gate runs of {MODEL}" in text
    for r in records:
        assert r.run_id in text
    for word in ("reuse", "retrain", "rebuild", "failed", "0.085", "0.31", "epochs_to_target 12 [8-16] / 14"):
        assert word in text
    assert "2026-01-02T00:00:00Z" in text


def test_audit_main_exit_codes(registry: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert audit_report.audit_main(MODEL, registry["uri"], as_json=False) == 0
    out = capsys.readouterr().out
    assert registry["gate_ids"][0] in out and "rebuild" in out

    assert audit_report.audit_main(MODEL, registry["uri"], as_json=True, registry_uri=registry["uri"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(GATES)

    assert audit_report.audit_main("no-such-model", registry["uri"], as_json=False) == 3
    err = capsys.readouterr().err.strip()
    assert "no gate runs" in err and "\n" not in err

    missing = tmp_path / "missing.db"
    assert audit_report.audit_main(MODEL, f"sqlite:///{missing}", as_json=False) == 3
    assert "no MLflow database" in capsys.readouterr().err
    assert not missing.exists()  # reading never creates a registry

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = time.monotonic()
    assert audit_report.audit_main(MODEL, f"http://127.0.0.1:{port}", as_json=False) == 3
    assert time.monotonic() - t < 10
    err = capsys.readouterr().err.strip()
    assert "unreachable" in err and "\n" not in err


def test_reads_what_the_gate_writes(tmp_path: Path, cnn_onnx, write_npz) -> None:
    """Contract with the writer: a gate run made by ``registry.gate.run_gate`` reads back complete."""
    from conftest import make_images

    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, Origin, run_gate
    from resque_airflow.registry.publish import publish_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = make_images(200, seed=1)
    publish_model(tracking_uri=uri, name="cnn", model_path=cnn_onnx[1], reference=str(write_npz("ref.npz", x, y)))
    xs, ys = make_images(150, seed=2, shift=0.8)
    outcome = run_gate(
        GateRequest("models:/cnn@champion", str(write_npz("new.npz", xs, ys))),
        client=make_client(uri),
        origin=Origin(dag_id="d", run_id="r", task_id="gate", try_number=1, map_index=-1),
        routes={"reuse": ["reuse"], "retrain": ["retrain"], "rebuild": ["rebuild"]},
    )
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert audit.models_with_gates(client) == ["cnn"]
    (record,) = audit.gate_history(client, "cnn")
    assert record.run_id == outcome.gate_run_id
    assert record.score == pytest.approx(outcome.score)
    assert record.decision == outcome.decision and record.branch == outcome.branch[0]
    assert record.status == "decided" and record.model_version == "1" and record.model_alias == "champion"
    assert record.n_samples == 150 and record.provider == outcome.provider
    assert record.thresholds == {"reuse": outcome.thresholds["reuse"], "rebuild": outcome.thresholds["rebuild"]}
    assert record.airflow["dag_id"] == "d" and "mmd" in record.signals
    detail = audit.gate_detail(client, record.run_id)
    assert {c["class"]: c["angle"] for c in detail.per_class} == pytest.approx(outcome.per_class)
    # The calibrated decision, as the real gate writes it.
    assert record.interval == pytest.approx(outcome.interval) and record.reason == outcome.reason
    det = outcome.calibration["detection"]
    assert record.null_quantile == pytest.approx(det["null_quantile"]) and record.shift_detected == det["detected"]
    assert detail.alpha == det["alpha"] and detail.p_value == pytest.approx(det["p_value"])
    est = outcome.calibration["accuracy_estimated"]
    assert (detail.accuracy_estimated or {}).get("value") == (pytest.approx(est["value"]) if est else None)


def test_calibrated_fields(client, registry: dict[str, Any]) -> None:
    """The calibrated decision reads back: from metrics and tags in the history, completed by the artifact."""
    records = audit.gate_history(client, MODEL)
    rec = records[5]
    cal = GATES[5]["calibrated"]
    assert rec.interval == list(cal["interval"]) and rec.null_quantile == cal["null_quantile"]
    assert rec.p_value == cal["p_value"] and rec.shift_detected is True
    assert rec.accuracy_measured == {"value": 0.87, "low": 0.84, "high": 0.90}
    assert rec.accuracy_estimated == {"value": 0.88, "low": 0.85, "high": 0.91}
    assert records[6].accuracy_measured is None and records[6].accuracy_estimated["value"] == 0.89
    assert rec.reason == REASON and rec.policy == "calibrated+cost"
    assert rec.prediction == {"cost_metric": "steps_to_target", "predicted": 60.0, "low": 40.0, "high": 90.0,
                              "rebuild_cost": 400.0}  # fmt: skip
    assert rec.alpha is None  # only the artifact holds alpha and the forecast's basis
    assert rec.measured_back == {"steps_to_target": 72.0, "censored": 0.0}
    assert (rec.challenger_run_id, rec.challenger_outcome) == ("challenger-of-5", "met_target")
    assert rec.gate_key == "resque_gate/scheduled__2026-01-06/gate/-1"
    assert rec.angles == per_class_angles(5)
    # measured cost: the write-back on the gate run
    assert {r["metric"]: r["measured"] for r in records[6].cost_comparison()} == {"steps_to_target": 55.0}
    assert records[0].interval is None and records[0].shift_detected is None and records[0].reason is None

    detail = audit.gate_detail(client, rec.run_id)
    assert detail.alpha == 0.01 and detail.shift_detected is True
    assert detail.prediction["basis"] == "prior" and detail.prediction["n_history"] == 0
    assert detail.interval == list(cal["interval"])
    json.dumps(detail.to_dict(), allow_nan=False)


def test_cost_pairs_and_class_moves(client) -> None:
    from resque_airflow.registry import audit_costs

    records = audit.gate_history(client, MODEL)
    pairs = audit_costs.cost_pairs(records)
    assert pairs["metric"] == "steps_to_target"  # tied with epochs_to_target on pairs: COST_METRICS order
    rows = {r["run_id"]: r for r in pairs["rows"]}
    assert set(rows) == {records[5].run_id, records[6].run_id}
    assert rows[records[5].run_id]["inside"] is True and rows[records[6].run_id]["inside"] is False
    assert rows[records[5].run_id]["ratio"] == pytest.approx(1.2)
    assert (pairs["n_pairs"], pairs["n_inside"]) == (2, 1)
    assert pairs["median_ratio"] == pytest.approx((1.2 + 55 / 30) / 2)
    epochs = audit_costs.cost_pairs(records, "epochs_to_target")
    assert [r["measured"] for r in epochs["rows"]] == [14.0]

    detail = audit.gate_detail(client, records[6].run_id)
    moves = audit_costs.class_moves(records, detail)
    assert moves["threshold_kind"] == "null quantile" and moves["threshold"] == 0.013
    assert moves["previous_run_id"] == records[5].run_id
    assert [r["class"] for r in moves["rows"]] == [str(k) for k in reversed(range(N_CLASSES))]  # largest first
    top = moves["rows"][0]
    assert top["change"] == pytest.approx(per_class_angles(6)["9"] - per_class_angles(5)["9"])
    assert moves["n_moved"] == N_CLASSES
    threshold_run = audit.gate_detail(client, records[0].run_id)
    first = audit_costs.class_moves(records, threshold_run)
    assert first["threshold_kind"] == "reuse threshold" and first["previous_run_id"] is None
    assert [r["moved"] for r in first["rows"]].count(True) == sum(v > 0.02 for v in per_class_angles(0).values())


def test_gate_runs_for_airflow(client, registry: dict[str, Any]) -> None:
    gate_ids = registry["gate_ids"]
    (one,) = audit.gate_runs_for(client, "resque_gate", "scheduled__2026-01-06")
    assert one.run_id == gate_ids[5]
    (ti,) = audit.gate_runs_for(client, "resque_gate", "scheduled__2026-01-06", "gate", -1)
    assert ti.run_id == gate_ids[5]
    assert audit.gate_runs_for(client, "resque_gate", "scheduled__2026-01-06", "gate", 3) == []
    assert audit.gate_runs_for(client, "resque_gate", "scheduled__2026-01-06", "other_task") == []
    assert [r.run_id for r in audit.gate_runs_for(client, "resque_gate")] == gate_ids
    assert audit.gate_runs_for(client, "no_such_dag") == []
    with pytest.raises(LookupError):
        audit.gate_runs_for(client, "d", 'it\'s "both"')
