"""Label-free accuracy: average thresholded confidence (ATC; Garg et al., ICLR 2022).

At publish time the threshold ``t`` is chosen so that the fraction of *reference* samples whose top-class
confidence exceeds ``t`` equals the reference accuracy. On new data the estimated accuracy is the fraction of new
samples above ``t``. Both sides only need a histogram of confidences: a counter, so it merges across shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resque_airflow.core.accumulator import Mergeable
from resque_airflow.errors import ResqueInputError

DEFAULT_BINS = 2000


class ConfidenceHistogram(Mergeable):
    """Counts of top-class confidences in ``bins`` equal bins over [0, 1]; ``update`` / ``+`` / ``+=`` as usual.

    Example:
        >>> import numpy as np
        >>> h = ConfidenceHistogram(bins=10).update(np.array([0.05, 0.55, 0.95, 0.97]))
        >>> h += ConfidenceHistogram(bins=10).update(np.array([0.99]))
        >>> h.n, h.fraction_above(0.5)
        (5, 0.8)
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if int(bins) < 2:
            raise ResqueInputError(f"bins: expected >= 2, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, np.int64)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def update(self, confidence: np.ndarray) -> ConfidenceHistogram:
        """Add ``(N,)`` confidences in [0, 1]."""
        c = np.asarray(confidence, np.float64).ravel()
        idx = np.clip((c * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)
        return self

    def fraction_above(self, threshold: float) -> float:
        """Fraction of samples in bins wholly above ``threshold`` (bin resolution: ``1 / bins``)."""
        if self.n == 0:
            raise ResqueInputError("confidence histogram: no samples")
        first = int(np.ceil(threshold * self.bins - 1e-9))
        return float(self.counts[min(max(first, 0), self.bins) :].sum() / self.n)

    def threshold_for(self, fraction: float) -> float:
        """The bin edge ``t`` with ``fraction_above(t)`` closest to ``fraction`` (the ATC threshold)."""
        above = np.concatenate([np.cumsum(self.counts[::-1])[::-1], [0]]) / max(self.n, 1)  # above[i]: bins >= i
        return float(np.argmin(np.abs(above - fraction)) / self.bins)

    def _signature(self) -> dict[str, int]:
        return {"bins": self.bins}

    def _merge(self, other: ConfidenceHistogram) -> None:
        self.counts += other.counts


def wilson_interval(successes: float, n: int, coverage: float = 0.9) -> tuple[float, float]:
    """Wilson score interval of a proportion.

    >>> [round(v, 3) for v in wilson_interval(90, 100)]
    [0.84, 0.939]
    """
    from statistics import NormalDist

    if n <= 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf((1 + coverage) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


@dataclass(frozen=True)
class AccuracyEstimate:
    """ATC's estimate of accuracy on unlabelled data, with a sampling interval (it does not cover ATC's own bias)."""

    value: float
    low: float
    high: float
    threshold: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "threshold": self.threshold}


def atc_threshold(reference: ConfidenceHistogram, reference_accuracy: float) -> float:
    """The confidence above which the fraction of reference samples equals their accuracy."""
    if not 0.0 <= reference_accuracy <= 1.0:
        raise ResqueInputError(f"reference_accuracy: expected a value in [0, 1], got {reference_accuracy!r}")
    return reference.threshold_for(reference_accuracy)


def atc_estimate(new: ConfidenceHistogram, threshold: float, coverage: float = 0.9) -> AccuracyEstimate:
    """Estimated accuracy of new data: the fraction of its confidences above the ATC ``threshold``."""
    frac = new.fraction_above(threshold)
    low, high = wilson_interval(frac * new.n, new.n, coverage)
    return AccuracyEstimate(frac, low, high, threshold)
