"""CostModel: monotonicity, interval coverage, JSON round trip, missing signals, and two-signal synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from resque_airflow.core.costmodel import MIN_HISTORY, SIGNALS, CostModel, Prediction
from resque_airflow.errors import ResqueInputError


def synthetic(n: int, seed: int, noise: float = 0.3, signals=("a", "b", "c")):
    """log1p(cost) = 1 + 2a + 1b + 0c + N(0, noise): ``c`` is an irrelevant signal."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, len(signals)))
    t = 1 + 2 * x[:, 0] + 1 * x[:, 1] + rng.normal(0, noise, n)
    rows = [dict(zip(signals, r, strict=True)) for r in x]
    return rows, np.expm1(t), x


def test_learns_the_weights_and_ignores_an_irrelevant_signal():
    rows, y, _ = synthetic(200, 0, noise=0.05)
    m = CostModel(signals=("a", "b", "c")).fit(rows, y)
    w = m.explain()["weights"]
    assert w["a"] == pytest.approx(2, abs=0.1)
    assert w["b"] == pytest.approx(1, abs=0.1)
    assert abs(w["c"]) < 0.1
    assert m.explain()["target"] == "log1p(cost)"


def test_monotone_where_declared_even_when_the_data_disagree():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (80, 3))
    # Cost falls with "a" and rises with "b"; "a" is declared +1, "b" -1, "c" free (falls with c).
    t = 2 - 1.5 * x[:, 0] + 1.5 * x[:, 1] - 1.0 * x[:, 2] + rng.normal(0, 0.1, 80)
    rows = [dict(zip("abc", r, strict=True)) for r in x]
    m = CostModel(signals=tuple("abc"), monotone={"a": 1, "b": -1, "c": 0}).fit(rows, np.expm1(np.maximum(t, 0)))
    w = m.explain()["weights"]
    assert w["a"] >= 0 and w["b"] <= 0
    assert w["c"] < -0.5  # the free signal keeps its (negative) sign
    grid = np.linspace(-0.5, 1.5, 41)  # beyond the training range too
    base = {"a": 0.5, "b": 0.5, "c": 0.5}
    for name, direction in (("a", 1), ("b", -1)):
        preds = np.array([m.predict(base | {name: v}).value for v in grid])
        assert np.all(direction * np.diff(preds) >= -1e-12), name


def test_default_signals_are_all_declared_non_decreasing():
    m = CostModel()
    assert m.candidates == SIGNALS
    assert set(m.monotone.values()) == {1}
    assert MIN_HISTORY >= 3


def test_intervals_cover_held_out_points_at_the_nominal_rate():
    coverages = []
    for seed in range(5):
        rows, y, _ = synthetic(120, seed, noise=0.3)
        test_rows, test_y, _ = synthetic(1000, 100 + seed, noise=0.3)
        m = CostModel(signals=("a", "b", "c"), coverage=0.9).fit(rows, y)
        preds = [m.predict(r) for r in test_rows]
        coverages.append(np.mean([p.low <= v <= p.high for p, v in zip(preds, test_y, strict=True)]))
        assert all(p.low <= p.value <= p.high for p in preds)
    # Jackknife intervals: about 90% on exchangeable data (finite-sample wiggle of a few points).
    assert 0.85 <= np.mean(coverages) <= 0.95, coverages
    # A wider nominal level gives wider intervals.
    p80, p95 = m.predict(test_rows[0], coverage=0.8), m.predict(test_rows[0], coverage=0.95)
    assert p95.high - p95.low > p80.high - p80.low


def test_interval_is_infinite_when_history_is_too_short_for_the_coverage():
    rows, y, _ = synthetic(8, 3)
    p = CostModel(signals=("a", "b", "c"), coverage=0.9).fit(rows, y).predict(rows[0])
    assert math.isinf(p.high) and p.low == 0.0  # ceil(0.9 * 9) = 9 > 8 residuals


def test_json_round_trip_gives_identical_predictions():
    rows, y, _ = synthetic(50, 4)
    m = CostModel(signals=("a", "b", "c"), coverage=0.8).fit(rows, y)
    m2 = CostModel.from_dict(json.loads(json.dumps(m.to_dict())))
    for r in [*rows[:10], {"a": 3.0}, {}]:
        assert m2.predict(r) == m.predict(r)
    assert m2.explain() == m.explain()
    assert isinstance(m.predict(rows[0]), Prediction)
    assert set(m.predict(rows[0]).to_dict()) == {"value", "low", "high", "coverage"}


def test_from_dict_rejects_damaged_or_newer_models():
    rows, y, _ = synthetic(20, 5)
    d = CostModel(signals=("a", "b", "c")).fit(rows, y).to_dict()
    with pytest.raises(ResqueInputError, match="newer"):
        CostModel.from_dict(d | {"format_version": 99})
    with pytest.raises(ResqueInputError, match="malformed"):
        CostModel.from_dict({k: v for k, v in d.items() if k != "coef"})
    with pytest.raises(ResqueInputError, match="do not match"):
        CostModel.from_dict(d | {"coef": [1.0]})


def test_missing_signals_dropped_in_training_and_imputed_at_prediction():
    rows, y, _ = synthetic(60, 6)
    rows = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        if i % 2:
            r["c"] = None  # missing in half the runs: dropped
        if i == 0:
            r["a"] = float("nan")  # missing once: imputed with the mean
        r["d"] = 1.0  # constant: dropped
    m = CostModel(signals=("a", "b", "c", "d")).fit(rows, y)
    e = m.explain()
    assert set(e["weights"]) == {"a", "b"}
    assert "missing" in e["dropped"]["c"] and "constant" in e["dropped"]["d"]
    mean_a = float(np.nanmean([r["a"] for r in rows]))
    full = m.predict({"a": mean_a, "b": 0.3})
    for missing in ({"b": 0.3}, {"a": None, "b": 0.3}, {"a": float("nan"), "b": 0.3}, {"a": "n/a", "b": 0.3}):
        assert m.predict(missing) == full
    # Unknown signals are ignored.
    assert m.predict({"a": mean_a, "b": 0.3, "zzz": 5.0}) == full


def test_beats_the_best_single_signal_when_cost_depends_on_two_signals():
    rng = np.random.default_rng(7)
    n = 300
    s1, s2, s3 = rng.uniform(0, 1, (3, n))
    # Like RESQUE with a noise shift: the cost depends on two signals, neither of which ranks it alone.
    t = 1 + 2 * s1 + 2 * s2 + rng.normal(0, 0.2, n)
    rows = [{"resque_dist": a, "mmd": b, "ks": c} for a, b, c in zip(s1, s2, s3, strict=True)]
    y = np.expm1(t)
    m = CostModel(signals=("resque_dist", "mmd", "ks")).fit(rows[:100], y[:100])
    pred = m.predict_transformed(rows[100:])
    model_rho = spearmanr(pred, y[100:]).statistic
    single = max(spearmanr([r[s] for r in rows[100:]], y[100:]).statistic for s in ("resque_dist", "mmd", "ks"))
    assert model_rho > single + 0.1
    assert model_rho > 0.9


def test_input_errors():
    rows, y, _ = synthetic(10, 8)
    with pytest.raises(ResqueInputError, match="at least 3"):
        CostModel(signals=("a",)).fit(rows[:2], y[:2])
    with pytest.raises(ResqueInputError, match="rows of signals"):
        CostModel(signals=("a",)).fit(rows, y[:5])
    with pytest.raises(ResqueInputError, match=">= 0"):
        CostModel(signals=("a",)).fit(rows, -y)
    with pytest.raises(ResqueInputError, match="not fitted"):
        CostModel().predict({"resque_dist": 0.1})
    with pytest.raises(ResqueInputError, match="coverage"):
        CostModel(coverage=1.5)
    with pytest.raises(ResqueInputError, match="monotone"):
        CostModel(monotone={"resque_dist": 2})


def test_linear_target_and_intercept_only_model():
    rows, y, _ = synthetic(30, 9)
    lin = CostModel(signals=("a", "b"), log_target=False).fit(rows, y)
    assert lin.explain()["target"] == "cost"
    assert lin.predict(rows[0]).value > 0
    # No usable signal at all: the model predicts the mean of log1p(cost).
    flat = CostModel(signals=("zzz",)).fit(rows, y)
    assert flat.explain()["weights"] == {}
    assert flat.predict({}).value == pytest.approx(float(np.expm1(np.mean(np.log1p(y)))))
