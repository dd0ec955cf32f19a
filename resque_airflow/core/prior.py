"""The cold-start cost prior: fine-tuning cost relative to training anew, for a model with no retrain history.

Raw RESQUE values do not transfer between models (their noise floor depends on the representation and the batch
size), so the prior is fitted on *calibrated* signals that do:

- ``excess``: the score over its null quantile at this batch size (1.0 is the edge of detection);
- ``accuracy_drop_relative``: ``1 - accuracy / reference accuracy`` (measured with labels, else estimated by ATC).

Its target is ``steps to reach the target by fine-tuning / steps to reach it training from scratch``, so a
prediction is multiplied by the model's own recorded training cost (steps, kWh) to give a cost in that model's
units. The prior ships in ``cost_prior.json`` (written by ``benchmarks/fit_prior.py`` from the evidence runs;
``tests/test_shipped_defaults.py`` pins it to those runs).

As a model's own retrain history grows, :func:`forecast_relative` corrects the prior by the mean residual of that
history, shrunk towards the prior as if the prior were :data:`PRIOR_WEIGHT` runs, and narrows the interval from the
prior's width to the history's own spread with the same weights: with ``n`` runs of history the prior counts for
``PRIOR_WEIGHT / (PRIOR_WEIGHT + n)`` of both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from resque_airflow.core.costmodel import CostModel

PRIOR_PATH = Path(__file__).with_name("cost_prior.json")
PRIOR_SIGNALS = ("excess", "accuracy_drop_relative")
PRIOR_WEIGHT = 5  # the prior counts as this many runs of the model's own history
COVERAGE = 0.9


def transfer_signals(
    score: float, null_quantile: float | None, accuracy: float | None, reference_accuracy: float | None
) -> dict[str, float | None]:
    """The prior's signals from a gate's calibrated numbers (None where unknown).

    >>> {k: round(v, 4) for k, v in transfer_signals(0.03, 0.01, 0.8, 0.9).items()}
    {'excess': 3.0, 'accuracy_drop_relative': 0.1111}
    """
    excess = score / null_quantile if null_quantile and null_quantile > 0 else None
    drop = None
    if accuracy is not None and reference_accuracy:
        drop = 1.0 - accuracy / reference_accuracy
    return {"excess": excess, "accuracy_drop_relative": drop}


@lru_cache(maxsize=1)
def load_prior(path: str | None = None) -> CostModel:
    """The shipped prior (or the one at ``path``)."""
    return CostModel.from_dict(json.loads(Path(path or PRIOR_PATH).read_text()))


@dataclass(frozen=True)
class RelativeForecast:
    """Fine-tuning cost as a fraction of training anew: ``value`` in ``[low, high]`` (``COVERAGE``)."""

    value: float
    low: float
    high: float
    basis: str  # "prior" or "prior+history"
    n_history: int


def forecast_relative(
    signals: Mapping[str, float | None],
    history: Sequence[tuple[Mapping[str, float | None], float]] = (),
    prior: CostModel | None = None,
) -> RelativeForecast:
    """Predict relative fine-tuning cost from ``signals``, corrected by ``history`` of ``(signals, relative cost)``.

    >>> f = forecast_relative({"excess": 3.0, "accuracy_drop_relative": 0.1})
    >>> 0 <= f.low <= f.value <= f.high, f.basis
    (True, 'prior')
    """
    prior = prior or load_prior()
    t = float(prior.predict_transformed([signals])[0])
    p = prior.predict(signals, COVERAGE)
    h_prior = math.log1p(p.high) - t if math.isfinite(p.high) else math.inf
    n = len(history)
    shift, h = 0.0, h_prior
    if n:
        predicted = prior.predict_transformed([s for s, _ in history])
        residuals = np.log1p(np.maximum([c for _, c in history], 0.0)) - predicted
        shift = float(residuals.sum() / (PRIOR_WEIGHT + n))
        own = float(np.quantile(np.abs(residuals - shift), COVERAGE)) if n >= 2 else h_prior
        h = (PRIOR_WEIGHT * h_prior + n * own) / (PRIOR_WEIGHT + n)
    centre = t + shift
    value = max(math.expm1(centre), 0.0)
    low = max(math.expm1(centre - h), 0.0) if math.isfinite(h) else 0.0
    high = math.expm1(centre + h) if math.isfinite(h) else math.inf
    return RelativeForecast(value, low, high, "prior+history" if n else "prior", n)
