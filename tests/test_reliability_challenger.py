"""A challenger must earn its alias: one that misses its target never takes ``@challenger``; a worse one is never
promoted to ``@champion`` (issue 15, item 1; issue 14, item 4). Real SQLite MLflow registries in temp folders."""

from __future__ import annotations

import pytest

from resque_airflow.registry import names
from resque_airflow.registry.client import ensure_experiment, make_client

MODEL = "digits-cnn"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, digits_cnn):
    import torch

    from resque_airflow.examples import digits
    from resque_airflow.registry.publish import publish_model
    from resque_airflow.runtime.export import export_torch

    home = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{home}/mlflow.db"
    s, onnx_path, ref, cost = digits_cnn.splits, digits_cnn.onnx_path, digits_cnn.reference, digits_cnn.cost
    common = {
        "tracking_uri": uri,
        "name": MODEL,
        "reference": str(ref),
        "weights_path": digits_cnn.weights,
        "torch_factory": "resque_airflow.examples.digits:make_model",
        "training_cost": cost.to_metrics(),
    }
    publish_model(model_path=onnx_path, **common)
    publish_model(model_path=onnx_path, alias="challenger", **common)  # a good challenger already on file (v2)
    untrained = export_torch(digits.make_model(seed=5), torch.from_numpy(s.train.x[:2]), home / "u.onnx",
                             layer="conv2").path  # fmt: skip
    data = digits.write_npz(home / "new.npz", s.test.x, s.test.y)
    return uri, data, untrained, common


def _gate_run(client) -> str:
    exp = ensure_experiment(client, names.DEFAULT_EXPERIMENT)
    return client.create_run(exp, tags={names.KIND_TAG: names.KIND_GATE}).info.run_id


def test_a_challenger_that_misses_its_target_never_takes_the_alias(registry):
    from resque_airflow.registry.challenger import TARGET_MISSED, TARGET_TAG, train_challenger

    uri, data, _, _ = registry
    client = make_client(uri)
    good = client.get_model_version_by_alias(MODEL, "challenger").version
    gate_run_id = _gate_run(client)
    gate = {"model_name": MODEL, "model_version": "1", "gate_run_id": gate_run_id}
    # A rebuild from fresh weights capped at a quarter epoch cannot reach 0.95 x the champion's accuracy.
    out = train_challenger(tracking_uri=uri, gate_result=gate, data_uri=str(data), fresh=True, max_epochs=0.25,
                           measure_energy=False)  # fmt: skip
    assert out["censored"] == 1.0 and out["met_target"] is False and out["alias"] is None
    assert client.get_model_version_by_alias(MODEL, "challenger").version == good  # the good one is kept
    missed = client.get_model_version(MODEL, out["version"])
    assert missed.tags[TARGET_TAG] == TARGET_MISSED and not missed.aliases
    assert client.get_run(out["run_id"]).data.tags[TARGET_TAG] == TARGET_MISSED
    written_back = client.get_run(gate_run_id).data
    assert written_back.metrics["measured_censored"] == 1.0
    assert written_back.tags["resque.challenger_outcome"] == "missed_target"


def test_a_worse_challenger_is_not_promoted(registry):
    from resque_airflow.registry.promotion import promote_challenger
    from resque_airflow.registry.publish import publish_model

    uri, data, untrained, common = registry
    client = make_client(uri)
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    worse = publish_model(model_path=untrained, alias="challenger", **common).version  # random weights
    out = promote_challenger(client, MODEL, data_uri=str(data))
    assert out["promoted"] is False and out["challenger_version"] == worse
    assert out["challenger_accuracy"] < out["champion_accuracy"] and "validation failed" in out["reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    run = client.get_run(out["run_id"])
    assert run.data.tags["resque.promoted"] == "false"


def test_a_better_challenger_is_promoted(registry):
    from resque_airflow.registry.promotion import promote_challenger
    from resque_airflow.registry.publish import publish_model

    uri, data, untrained, common = registry
    client = make_client(uri)
    # Make the champion the worse one, so the trained version on file is the better challenger.
    worse = publish_model(model_path=untrained, alias="champion", **common).version
    trained = client.get_model_version(MODEL, "1").version
    client.set_registered_model_alias(MODEL, "challenger", trained)
    out = promote_challenger(client, MODEL, data_uri=str(data))
    assert out["promoted"] is True and out["champion_version"] == worse
    assert client.get_model_version_by_alias(MODEL, "champion").version == trained
