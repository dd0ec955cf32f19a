"""The calibrated decision through the product's own path: real ONNX models, real passes, real registry runs.

The data is the quadrant-image generator of tests/conftest.py, so clean batches are unlimited: the false-alarm rate
is measured on many fresh, disjoint, unshifted batches (held out from the reference by construction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_images

from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.runtime import pipeline


def make_mlp():
    """A tiny untrained MLP on (N, 1, 8, 8) inputs: a second representation (the classifier's input, 32-d)."""
    import torch
    from torch import nn

    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def model(request, cnn_onnx, tmp_path_factory):
    """``(ONNX path, fingerprint)`` of one of two real models, fingerprinted on 5,000 clean reference images."""
    import torch

    from resque_airflow.runtime.export import export_torch

    home = tmp_path_factory.mktemp(request.param)
    if request.param == "cnn":
        path = cnn_onnx[1]
    else:
        path = export_torch(make_mlp(), torch.randn(2, 1, 8, 8), home / "mlp.onnx").path
    x, y = make_images(5000, seed=1)
    np.savez(home / "ref.npz", x=x, y=y)
    return path, pipeline.fingerprint_model(path, str(home / "ref.npz"))


def _score(model, tmp_path, n: int, seed: int, shift: float = 0.0, alpha: float = 0.01, **kw):
    path, fp = model
    x, y = make_images(n, seed=seed, shift=shift)
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    return pipeline.score_dist(path, fp, str(tmp_path / "batch.npz"), alpha=alpha, **kw)


@pytest.mark.parametrize(("n", "batches"), [(100, 100), (1000, 40)])
def test_false_alarm_rate_on_unshifted_batches(model, tmp_path, n, batches):
    alpha = 0.05  # enough alarms to count at these batch numbers; the core test also checks alpha = 0.01
    alarms = sum(_score(model, tmp_path, n, seed=100 + b, alpha=alpha).calibration.detection.detected
                 for b in range(batches))  # fmt: skip
    assert alarms / batches <= 2 * alpha, f"{alarms} false alarms in {batches} clean batches of {n}"


def test_a_real_shift_is_detected_with_an_interval_that_excludes_the_noise_floor(model, tmp_path):
    clean = _score(model, tmp_path, 1000, seed=7)
    shifted = _score(model, tmp_path, 1000, seed=7, shift=0.3)
    assert shifted.calibration.detection.detected and shifted.calibration.detection.p_value < 0.01
    assert shifted.score > clean.score
    lo, hi = shifted.interval
    assert 0 < lo <= hi  # a real shift: the interval stays away from 0
    assert clean.interval[0] <= clean.score  # the interval of pure noise reaches down towards 0


def test_one_pass_and_shards_in_any_order_give_the_same_interval_and_decision(model, tmp_path):
    path, fp = model
    x, y = make_images(1200, seed=11, shift=0.1)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    one = pipeline.score_dist(path, fp, str(tmp_path / "all.npz"))
    from resque_airflow.runtime.embed import Embedder

    embedder = Embedder(Path(path).read_bytes(), layer=fp.layer)
    parts = []
    for i in range(3):  # shard boundaries on batch boundaries: the features of every row are the same
        np.savez(tmp_path / f"part{i}.npz", x=x[i * 400 : (i + 1) * 400], y=y[i * 400 : (i + 1) * 400])
        parts.append(pipeline.summarise(embedder, fp, str(tmp_path / f"part{i}.npz"), batch_size=200)[0])
    for order in ([0, 1, 2], [2, 0, 1]):
        merged = sum(parts[i] for i in order)
        sharded = pipeline.dist_result(fp, merged, label_source="given", provider="cpu", data_uri="", data_hash="")
        assert sharded.score == pytest.approx(one.score, abs=1e-12)
        np.testing.assert_allclose(sharded.interval, one.interval, atol=1e-9)
        assert sharded.calibration.detection.p_value == one.calibration.detection.p_value
        assert sharded.calibration.detection.detected == one.calibration.detection.detected


def test_label_free_accuracy_estimate_tracks_the_measured_accuracy(model, tmp_path):
    result = _score(model, tmp_path, 2000, seed=13, shift=0.15)
    cal = result.calibration
    assert cal.measured is not None and cal.estimated is not None
    assert cal.estimated.low <= cal.estimated.value <= cal.estimated.high
    assert abs(cal.estimated.value - cal.measured.value) < 0.25  # ATC is an estimate; EVIDENCE.md reports its error


def test_a_constant_batch_is_a_data_issue_not_a_shift(model, tmp_path):
    path, fp = model
    np.savez(tmp_path / "flat.npz", x=np.full((300, 1, 8, 8), 0.5, np.float32), y=np.arange(300) % 4)
    result = pipeline.score_dist(path, fp, str(tmp_path / "flat.npz"))
    assert [p.check for p in result.sanity] == ["constant_inputs"]
    clean = _score(model, tmp_path, 300, seed=5)
    assert clean.sanity == []


@pytest.fixture
def published(tmp_path, cnn_onnx):
    from resque_airflow.registry.publish import publish_model

    x, y = make_images(2000, seed=1)
    np.savez(tmp_path / "ref.npz", x=x, y=y)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    publish_model(tracking_uri=uri, name="cnn", model_path=cnn_onnx[1], reference=str(tmp_path / "ref.npz"),
                  training_cost={"steps_to_target": 400.0, "energy_kwh": 0.02})  # fmt: skip
    return uri


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 0.0, "alpha: expected a false-alarm rate strictly between 0 and 1, got 0.0"),
        ("alpha", 1.5, "alpha: expected a false-alarm rate strictly between 0 and 1, got 1.5"),
        ("price_per_kwh", -1.0, "price_per_kwh: expected a non-negative number, got -1.0"),
        ("value_per_accuracy_point", float("nan"), "value_per_accuracy_point: expected a non-negative number"),
    ],
)
def test_bad_decision_parameters_fail_before_any_run_or_tag(published, tmp_path, field, value, message):
    from resque_airflow.registry.gate import GateRequest, run_gate

    x, y = make_images(200, seed=2)
    np.savez(tmp_path / "new.npz", x=x, y=y)
    client = make_client(published)
    before = dict(client.get_model_version("cnn", "1").tags)
    request = GateRequest(model_uri="models:/cnn@champion", data=str(tmp_path / "new.npz"), **{field: value})
    with pytest.raises(ResqueInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_gate(request, client=client)
    assert client.get_experiment_by_name(names.DEFAULT_EXPERIMENT) is None  # no gate run was ever opened
    assert dict(client.get_model_version("cnn", "1").tags) == before


def test_a_fresh_model_gets_a_calibrated_decision_with_a_predicted_cost(published, tmp_path):
    from resque_airflow.registry.gate import GateRequest, run_gate

    client = make_client(published)
    x, y = make_images(500, seed=3, shift=0.4)
    np.savez(tmp_path / "shifted.npz", x=x, y=y)
    out = run_gate(GateRequest(model_uri="models:/cnn@champion", data=str(tmp_path / "shifted.npz")), client=client)
    assert out.policy.startswith("calibrated") and out.calibration["detection"]["detected"]
    assert out.decision in ("retrain", "rebuild") and out.reason.endswith(f"-> {out.decision}")
    p = out.prediction
    assert p is not None and p["basis"] == "prior" and p["n_history"] == 0
    assert 0 <= p["low"] <= p["predicted"] <= p["high"] and p["rebuild_cost"] == 400.0
    run = client.get_run(out.gate_run_id)
    assert run.data.tags[names.REASON_TAG] == out.reason
    for metric in ("resque_score_low", "resque_score_high", "null_quantile", "p_value", "predicted_steps_to_target"):
        assert metric in run.data.metrics
    x, y = make_images(500, seed=4)
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    clean = run_gate(GateRequest(model_uri="models:/cnn@champion", data=str(tmp_path / "clean.npz")), client=client)
    assert clean.decision == "reuse" and clean.reason.startswith("no shift detected")
