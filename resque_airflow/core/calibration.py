"""Every score of a gate, calibrated: its interval, its null quantile at this batch size, and the accuracy estimate.

:func:`calibrate` turns two :class:`~resque_airflow.core.summary.FeatureSummary` objects (the fingerprint's
reference and the new batch, one pass or merged shards) into a :class:`Calibration`:

- the primary score (RESQUE_dist under the chosen label source) with a basic-bootstrap interval from the Poisson
  replicates both summaries carry (:mod:`resque_airflow.core.bootstrap`);
- its calibrated null at the new batch's own class counts and the check against it (:mod:`resque_airflow.core.null`);
- the null quantile of each companion that has a cheap null (RESQUE_dist under the other label sources, MMD, the
  confidence drop), so that a reader can tell noise from shift for every number the gate shows;
- the ATC accuracy estimate (:mod:`resque_airflow.core.atc`), beside the measured accuracy when labels came.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from resque_airflow.core.atc import atc_estimate, atc_threshold, wilson_interval
from resque_airflow.core.bootstrap import basic_interval, replicate_angles
from resque_airflow.core.metrics import DistScore, resque_dist
from resque_airflow.core.null import (
    DEFAULT_ALPHA,
    DEFAULT_NULL_REPLICATES,
    NullCheck,
    check_against,
    null_mean_drop,
    null_mmd,
    null_resque_dist,
)
from resque_airflow.core.policy import Accuracy
from resque_airflow.core.summary import FeatureSummary, sums_for

DEFAULT_COVERAGE = 0.9
COMPANION_NULL_REPLICATES = 300  # companions are shown, not decided on: a coarser null is enough


@dataclass(frozen=True)
class Calibration:
    """The calibrated view of one gate's scores; ``to_dict()`` is JSON-serialisable."""

    label_source: str
    dist: DistScore
    interval: tuple[float, float]
    coverage: float
    detection: NullCheck
    companions: dict[str, dict] = field(default_factory=dict)
    measured: Accuracy | None = None
    estimated: Accuracy | None = None
    atc_threshold: float | None = None

    @property
    def accuracy(self) -> Accuracy | None:
        """The accuracy the decision uses: measured when labels came, else ATC's estimate, else None."""
        return self.measured or self.estimated

    def to_dict(self) -> dict:
        def acc(a: Accuracy | None) -> dict | None:
            return None if a is None else {"value": a.value, "low": a.low, "high": a.high}

        return {
            "label_source": self.label_source,
            "score": self.dist.value,
            "interval": list(self.interval),
            "coverage": self.coverage,
            "detection": self.detection.to_dict(),
            "companions": self.companions,
            "accuracy_measured": acc(self.measured),
            "accuracy_estimated": acc(self.estimated),
            "atc_threshold": self.atc_threshold,
        }


def _companion_nulls(reference: FeatureSummary, new: FeatureSummary, primary: str, alpha: float) -> dict[str, dict]:
    out: dict[str, dict] = {}
    pool = reference.pool
    for source in ("given", "predicted", "none"):
        a, b = sums_for(reference, source), sums_for(new, source)
        if source == primary or not ((a.counts > 0) & (b.counts > 0)).any():
            continue
        labels = pool.labels(source)
        if source != "none" and (labels < 0).all():
            continue
        null = null_resque_dist(a.sums, a.counts, pool.x, labels, b.counts, replicates=COMPANION_NULL_REPLICATES)
        name = "resque_dist" if source == "given" else f"resque_dist_{source}"
        out[name] = check_against(resque_dist(a, b).value, null, alpha).to_dict()
    ref_mean, new_mean = reference.pooled.get()[0], new.pooled.get()[0]
    mmd = float(((ref_mean - new_mean) ** 2).sum())
    null = null_mmd(reference.pooled.sums[0], reference.n, pool.x, new.n, replicates=COMPANION_NULL_REPLICATES)
    out["mmd"] = check_against(mmd, null, alpha).to_dict()
    if reference.confidence is not None and new.confidence is not None and np.isfinite(pool.confidence).sum() >= 2:
        drop = reference.confidence - new.confidence
        null = null_mean_drop(pool.confidence, reference.confidence, reference.n_logits, new.n_logits)
        out["confidence_drop"] = check_against(drop, null, alpha).to_dict()
    return out


def calibrate(
    reference: FeatureSummary,
    new: FeatureSummary,
    *,
    label_source: str = "given",
    alpha: float = DEFAULT_ALPHA,
    coverage: float = DEFAULT_COVERAGE,
    null_replicates: int = DEFAULT_NULL_REPLICATES,
    seed: int = 0,
) -> Calibration:
    """Score ``new`` against ``reference`` under ``label_source`` with interval, calibrated null and ATC.

    Deterministic for given summaries: the same batch gives the same interval and decision whether it was scored
    in one pass or as shards merged in any order.
    """
    ref_sums, new_sums = sums_for(reference, label_source), sums_for(new, label_source)
    dist = resque_dist(ref_sums, new_sums)
    reps = replicate_angles(reference.replicates[label_source], new.replicates[label_source], dist.classes_compared)
    interval = basic_interval(dist.value, reps, coverage)
    pool = reference.pool
    null = null_resque_dist(
        ref_sums.sums, ref_sums.counts, pool.x, pool.labels(label_source), new_sums.counts,
        replicates=null_replicates, seed=seed,
    )  # fmt: skip
    detection = check_against(dist.value, null, alpha)
    measured = estimated = threshold = None
    if new.accuracy is not None:
        measured = Accuracy(new.accuracy, *wilson_interval(new.correct, new.given.n, coverage), "measured")
    if reference.accuracy is not None and reference.confidences.n and new.confidences.n:
        threshold = atc_threshold(reference.confidences, reference.accuracy)
        e = atc_estimate(new.confidences, threshold, coverage)
        estimated = Accuracy(e.value, e.low, e.high, "atc")
    return Calibration(
        label_source=label_source, dist=dist, interval=interval, coverage=coverage, detection=detection,
        companions=_companion_nulls(reference, new, label_source, alpha), measured=measured, estimated=estimated,
        atc_threshold=threshold,
    )  # fmt: skip
