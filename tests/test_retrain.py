"""fine_tune on a tiny digits subset: reaching a target, censoring, determinism, metrics, country-code validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resque_airflow.errors import ResqueInputError
from resque_airflow.examples.digits import load_digits_splits, make_model
from resque_airflow.registry.names import CENSORED_METRIC, COST_METRICS, FINAL_ACCURACY_METRIC
from resque_airflow.runtime.training import RetrainCost, fine_tune, validate_country_iso_code


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # the model is tiny; one thread is faster on a busy 2-core machine
    s = load_digits_splits(0)
    return s.train.x[:300], s.train.y[:300], s.heldout.x[:150], s.heldout.y[:150]


def run(data, **kw):
    # From scratch, SGD leaves its initial plateau after ~5-7 epochs here: 0.3 (chance is 0.1) is an easy target.
    args = dict(target_accuracy=0.3, max_epochs=15, lr=0.1, batch_size=8, seed=0, measure_energy=False)
    return fine_tune(make_model(seed=0), *data, **(args | kw))


def test_reaches_an_easy_target_and_reports_every_metric(tiny):
    cost = run(tiny, measure_energy=True)
    assert isinstance(cost, RetrainCost)
    assert not cost.censored
    assert cost.final_accuracy >= 0.3 > cost.initial_accuracy
    assert isinstance(cost.steps_to_target, int) and cost.steps_to_target > 0
    assert cost.steps_to_target == cost.steps_run  # stopped at the target
    # Quarter-epoch resolution (300 samples / 8 = 38 steps per epoch).
    assert (cost.epochs_to_target * 4) == int(cost.epochs_to_target * 4)
    assert cost.grad_norm_first > 0 and cost.grad_norm_mean > 0 and cost.param_change > 0 and cost.wall_s > 0
    # codecarbon works offline here; if it ever fails the values are NaN, never an exception.
    assert (cost.energy_kwh > 0 and cost.emissions_kg > 0) or (math.isnan(cost.energy_kwh))
    metrics = cost.to_metrics()
    assert set(metrics) == {*COST_METRICS, CENSORED_METRIC, FINAL_ACCURACY_METRIC}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics[CENSORED_METRIC] == 0.0


def test_metric_names_are_the_audit_trail_names(tiny):
    # runtime/training.py names the metrics after RetrainCost's fields; registry/names.py spells them for readers.
    assert tuple(run(tiny, max_epochs=0.25).to_metrics()) == (*COST_METRICS, CENSORED_METRIC, FINAL_ACCURACY_METRIC)


def test_deterministic_given_the_seed(tiny):
    a, b = run(tiny), run(tiny)
    assert (a.steps_to_target, a.param_change, a.final_accuracy) == (
        b.steps_to_target,
        b.param_change,
        b.final_accuracy,
    )
    c = run(tiny, seed=1)
    assert (c.steps_to_target, c.param_change) != (a.steps_to_target, a.param_change)


def test_censored_when_the_target_is_impossible(tiny):
    cost = run(tiny, target_accuracy=1.01, max_epochs=0.5)
    assert cost.censored
    assert cost.epochs_to_target == 0.5 == cost.epochs_run
    assert cost.steps_to_target == cost.steps_run == 19  # half of 38 steps per epoch
    assert cost.to_metrics()[CENSORED_METRIC] == 1.0
    assert math.isnan(cost.energy_kwh) and math.isnan(cost.emissions_kg)  # measure_energy=False


def test_no_training_when_the_target_is_already_met(tiny):
    cost = run(tiny, target_accuracy=0.0)
    assert (cost.steps_to_target, cost.epochs_to_target, cost.steps_run, cost.param_change) == (0, 0.0, 0, 0.0)
    assert not cost.censored
    # The gradient norm is still reported: one epoch of batches at the starting weights.
    assert cost.grad_norm_first > 0 and cost.grad_norm_mean == cost.grad_norm_first


def test_keeps_training_past_the_target_when_asked(tiny):
    cost = run(tiny, stop_at_target=False, max_epochs=2)
    assert cost.epochs_run == 2.0 and cost.steps_run == 76
    assert cost.steps_to_target <= cost.steps_run


def test_country_code_is_validated():
    assert validate_country_iso_code("usa") == "USA"
    with pytest.raises(ResqueInputError, match="no energy mix"):
        validate_country_iso_code("XXX")
    with pytest.raises(ResqueInputError, match="3-letter"):
        validate_country_iso_code("US")


def test_fine_tune_rejects_bad_country_and_inputs_before_training(tiny):
    with pytest.raises(ResqueInputError, match="no energy mix"):
        run(tiny, country_iso_code="ZZZ")
    x, y, hx, hy = tiny
    with pytest.raises(ResqueInputError, match="train data"):
        fine_tune(make_model(), x, y[:10], hx, hy, target_accuracy=0.5, max_epochs=1, lr=0.1, batch_size=8, seed=0)
    with pytest.raises(ResqueInputError, match="integers"):
        fine_tune(
            make_model(), x, y.astype(np.float32), hx, hy, target_accuracy=0.5, max_epochs=1, lr=0.1, batch_size=8,
            seed=0,
        )  # fmt: skip
    with pytest.raises(ResqueInputError, match="eval_every_fraction"):
        run(tiny, eval_every_fraction=0)
