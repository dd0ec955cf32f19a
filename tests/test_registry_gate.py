"""Publish and gate against a real SQLite MLflow registry: audit trail, retries, and failures that change nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import flip_byte, make_images

from resque_airflow.cli import main
from resque_airflow.core import FingerprintError, RegistryError, ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, Origin, failed_at, run_gate
from resque_airflow.registry.publish import publish_model


@pytest.fixture
def registry(tmp_path, cnn_onnx, write_npz):
    """A SQLite registry with the test CNN published as ``cnn@champion``; returns (uri, data paths)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = make_images(400, seed=10)
    ref = write_npz("ref.npz", x, y)
    published = publish_model(tracking_uri=uri, name="cnn", model_path=cnn_onnx[1], reference=str(ref),
                              training_cost={"wall_s": 12.0, "energy_kwh": 1e-4})  # fmt: skip
    assert published.version == "1" and published.alias == "champion"
    xc, yc = make_images(300, seed=11)
    xs, ys = make_images(300, seed=12, shift=0.8)
    data = {"clean": write_npz("clean.npz", xc, yc), "shifted": write_npz("shifted.npz", xs, ys)}
    return uri, data


def mv_tags(uri: str) -> dict:
    return dict(make_client(uri).get_model_version("cnn", "1").tags)


def gate_runs(uri: str, view="active"):
    from mlflow.entities import ViewType

    client = make_client(uri)
    exp = client.get_experiment_by_name(names.DEFAULT_EXPERIMENT)
    return client.search_runs(
        [exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY if view == "active" else ViewType.ALL
    )


def test_publish_records_fingerprint_and_training_cost(registry):
    uri, _ = registry
    client = make_client(uri)
    mv = client.get_model_version_by_alias("cnn", "champion")
    assert mv.tags["resque.model_sha256"] and mv.tags[names.TRAIN_RUN_MV_TAG] == mv.run_id
    run = client.get_run(mv.run_id)
    assert run.data.tags[names.KIND_TAG] == names.KIND_TRAIN
    assert run.data.metrics["wall_s"] == 12.0 and "reference_accuracy" in run.data.metrics
    files = {f.path for f in client.list_artifacts(mv.run_id, "model/extra_files")}
    assert files == {"model/extra_files/fingerprint.json", "model/extra_files/fingerprint.npz"}


def test_gate_run_metric_tags_and_decisions(registry):
    uri, data = registry
    clean = run_gate(GateRequest("models:/cnn@champion", str(data["clean"])), client=make_client(uri))
    shifted = run_gate(GateRequest("models:/cnn@champion", str(data["shifted"])), client=make_client(uri))
    assert clean.score < shifted.score
    assert clean.provider == "cpu" and clean.n_samples == 300 and clean.model_version == "1"
    json.dumps(clean.to_dict())  # XCom-safe
    runs = {r.info.run_id: r for r in gate_runs(uri)}
    assert set(runs) == {clean.gate_run_id, shifted.gate_run_id}
    run = runs[shifted.gate_run_id]
    assert run.info.status == "FINISHED" and run.data.tags[names.STATUS_TAG] == "decided"
    assert run.data.metrics[names.SCORE_METRIC] == pytest.approx(shifted.score)
    assert {"resque_dist_predicted", "resque_dist_none", "mmd", "ks", "acc_drop"} <= set(run.data.metrics)
    assert run.data.params["model_version"] == "1" and run.data.params["provider"] == "cpu"
    tags = mv_tags(uri)
    assert tags[names.MV_TAG_GATE_RUN] == shifted.gate_run_id
    assert tags[names.MV_TAG_DECISION] == shifted.decision
    assert float(tags[names.MV_TAG_SCORE]) == pytest.approx(shifted.score)


def test_retry_of_one_task_instance_leaves_one_gate_run(registry):
    uri, data = registry
    req = GateRequest("models:/cnn@champion", str(data["clean"]))
    first = run_gate(req, client=make_client(uri), origin=Origin("d", "r1", "gate", 1))
    second = run_gate(req, client=make_client(uri), origin=Origin("d", "r1", "gate", 2))
    active = gate_runs(uri)
    assert [r.info.run_id for r in active] == [second.gate_run_id]
    assert first.gate_run_id in {r.info.run_id for r in gate_runs(uri, view="all")}  # kept, soft-deleted
    assert mv_tags(uri)[names.MV_TAG_GATE_RUN] == second.gate_run_id


def test_failures_leave_tags_unchanged(registry, tmp_path):
    uri, data = registry
    ok = run_gate(GateRequest("models:/cnn@champion", str(data["clean"])), client=make_client(uri))
    before = mv_tags(uri)
    with pytest.raises(RegistryError, match=r"has no alias 'prod'; it has \['champion'\]"):
        run_gate(GateRequest("models:/cnn@prod", str(data["clean"])), client=make_client(uri))
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        run_gate(GateRequest("models:/nope@champion", str(data["clean"])), client=make_client(uri))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ResqueInputError, match="cannot read shard"):
        run_gate(GateRequest("models:/cnn@champion", str(tmp_path / "junk.npz")), client=make_client(uri))
    with pytest.raises(ResqueInputError, match="reuse_threshold"):
        run_gate(
            GateRequest("models:/cnn@champion", str(data["clean"]), reuse_threshold=0.5, rebuild_threshold=0.1),
            client=make_client(uri),
        )
    failed = [r for r in gate_runs(uri) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[names.STATUS_TAG] == "failed"
    # Tamper with the stored model file: the sha256 check refuses to run it.
    client = make_client(uri)
    source = client.get_model_version_download_uri("cnn", "1")
    model_file = f"{source}/model.onnx"
    flip_byte(model_file, -10)
    with pytest.raises(FingerprintError, match="recompute the fingerprint"):
        run_gate(GateRequest("models:/cnn@champion", str(data["clean"])), client=make_client(uri))
    assert mv_tags(uri) == before and before[names.MV_TAG_GATE_RUN] == ok.gate_run_id


def test_cli_publish_and_gate(tmp_path, cnn_onnx, write_npz, capsys):
    uri = f"sqlite:///{tmp_path}/cli.db"
    x, y = make_images(200, seed=1)
    ref = write_npz("r.npz", x, y)
    assert (
        main(
            [
                "publish",
                "--model",
                str(cnn_onnx[1]),
                "--reference",
                str(ref),
                "--name",
                "m",
                "--tracking-uri",
                uri,
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    new = write_npz("n.npz", *make_images(100, seed=2, shift=0.5))
    assert main(["gate", "--model-uri", "models:/m@champion", "--data", str(new), "--tracking-uri", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] in ("reuse", "retrain", "rebuild") and out["gate_run_id"] and out["per_class"]
    assert main(["gate", "--model-uri", "models:/m@nope", "--data", str(new), "--tracking-uri", uri]) == 3
    assert "has no alias 'nope'" in capsys.readouterr().err
    assert main(["gate", "--model-uri", "m@champion", "--data", str(new), "--tracking-uri", uri]) == 2


def test_shard_summaries_merge_to_the_single_pass_score(registry, tmp_path, write_npz):
    from resque_airflow.registry.artifacts import fetch_model
    from resque_airflow.registry.client import ModelRef, resolve_version
    from resque_airflow.runtime.embed import Embedder
    from resque_airflow.runtime.pipeline import summarise
    from resque_airflow.runtime.shards import ShardHeader, write_shard

    uri, data = registry
    xs, ys = make_images(300, seed=12, shift=0.8)
    client = make_client(uri)
    fetched = fetch_model(client, resolve_version(client, ModelRef.parse("models:/cnn@champion")), tmp_path / "dl")
    fp = fetched.fingerprint
    emb = Embedder(fetched.model_path.read_bytes(), layer=fp.layer, provider="cpu")
    shards = []
    for i, sl in enumerate((slice(0, 120), slice(120, 300))):
        part = write_npz(f"part{i}.npz", xs[sl], ys[sl])
        summary, stats = summarise(emb, fp, str(part))
        shards.append(
            write_shard(
                f"file://{tmp_path}/shards/s{i}.npz",
                summary,
                ShardHeader(fp.model_sha256, fp.layer, stats.n_samples, str(part), stats.data_hash, True),
            )
        )
    merged = run_gate(GateRequest("models:/cnn@champion", "", shard_summaries=shards[::-1]), client=make_client(uri))
    single = run_gate(GateRequest("models:/cnn@champion", str(data["shifted"])), client=make_client(uri))
    assert merged.score == pytest.approx(single.score, abs=1e-9) and merged.n_samples == 300
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    np.testing.assert_equal(merged.decision, single.decision)


def test_a_failed_gate_says_where_it_failed_and_which_run_it_marked_failed(registry, tmp_path):
    uri, data = registry
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ResqueInputError) as info:
        run_gate(GateRequest("models:/cnn@champion", str(tmp_path / "junk.npz")), client=make_client(uri))
    (failed,) = [r for r in gate_runs(uri) if r.info.status == "FAILED"]
    assert failed_at(info.value) == ("scoring", failed.info.run_id)
    with pytest.raises(RegistryError) as info:
        run_gate(GateRequest("models:/cnn@prod", str(data["clean"])), client=make_client(uri))
    assert failed_at(info.value) == ("resolving the model version", None)  # no gate run was opened


def test_cost_history_of_a_model_name_with_a_quote(tmp_path):
    """MLflow filters quote the model name: an apostrophe (o'brien-cnn) neither breaks the search nor matches others."""
    from resque_airflow.registry.client import ensure_experiment
    from resque_airflow.registry.costs import retrain_history

    client = make_client(f"sqlite:///{tmp_path}/mlflow.db", create=True)
    gate_exp, retrain_exp = (ensure_experiment(client, e) for e in (names.DEFAULT_EXPERIMENT, names.RETRAIN_EXPERIMENT))
    for model in ("o'brien-cnn", "brien-cnn"):
        gate = client.create_run(gate_exp, tags={names.KIND_TAG: names.KIND_GATE, names.MODEL_NAME_TAG: model})
        run = client.create_run(retrain_exp, tags={names.KIND_TAG: names.KIND_RETRAIN, names.MODEL_NAME_TAG: model,
                                                   names.GATE_RUN_TAG: gate.info.run_id})  # fmt: skip
        client.log_metric(run.info.run_id, "steps_to_target", 10.0)
    (point,) = retrain_history(client, "o'brien-cnn")
    assert point.cost == 10.0 and client.get_run(point.retrain_run_id).data.tags[names.MODEL_NAME_TAG] == "o'brien-cnn"
    assert retrain_history(client, "o'brien" + '"cnn') == []  # both quotes: not searchable, so no history
