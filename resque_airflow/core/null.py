"""The calibrated null: what each signal looks like between the reference and an *unshifted* batch of size n.

RESQUE_dist between two samples of the same distribution is not 0: it shrinks like ``1 / sqrt(n)`` and its scale
depends on the representation. A fixed threshold therefore means different things for different models and batch
sizes. The fingerprint keeps, from the same single pass that builds the class sums, a bounded uniform sample of
reference rows (features, given and predicted labels, confidence: the *pool*). At gate time, for the incoming
batch's own class counts ``n_k``, the null is simulated as

    t_k* = s_k / N_k  +  (c @ R_k) / n_k  +  (g @ R_k) / sqrt((m_k - 1) N_k)

where ``R_k`` are the pool's class-k residuals around their mean (``m_k`` rows), ``c ~ Poisson(n_k / m_k)`` per
row is a (Poisson) bootstrap draw of about ``n_k`` clean samples (the residuals are centred, so ``c @ R_k`` has the
covariance ``n_k`` times the class covariance, as a draw of exactly ``n_k`` would; the cost does not grow with
``n_k``) and ``g`` is Gaussian noise with the class covariance over ``N_k``: the reference sums are a sample too.
The false-alarm rate therefore holds on average over reference samples; with a batch larger than the reference,
the reference's own sampling error dominates and one particular reference can be off (keep ``N_k > n_k``). A class
with fewer than :data:`MIN_POOL_ROWS` pool rows borrows the residuals of every class (a shared within-class covariance).
``tests/test_core_calibration.py`` checks the simulated null against brute force (many disjoint clean batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from resque_airflow.errors import ResqueInputError

DEFAULT_NULL_REPLICATES = 1000
DEFAULT_ALPHA = 0.01
MIN_POOL_ROWS = 8


@dataclass(frozen=True)
class Pool:
    """Reference rows kept for calibration: ``(M, D)`` float32 features and ``(M,)`` per-row columns.

    ``given`` and ``predicted`` are class ids, -1 where unknown; ``confidence`` is the top-class probability, NaN
    where the model has no logits.
    """

    x: np.ndarray
    given: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray

    def labels(self, label_source: str) -> np.ndarray:
        """The pool's class of each row under ``label_source`` (``none``: all class 0)."""
        if label_source == "given":
            return self.given
        if label_source == "predicted":
            return self.predicted
        return np.zeros(self.x.shape[0], np.int64)


def _residuals(pool_x: np.ndarray, pool_y: np.ndarray, num_classes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-class residuals around the pool's class means, and all of them stacked (the shared fallback)."""
    per_class = []
    for k in range(num_classes):
        rows = pool_x[pool_y == k].astype(np.float64)
        per_class.append(rows - rows.mean(axis=0) if rows.shape[0] else rows)
    shared = np.concatenate([r for r in per_class if r.shape[0] >= 2] or [np.zeros((0, pool_x.shape[1]))])
    return per_class, shared


def simulate_class_means(
    ref_sums: np.ndarray,
    ref_counts: np.ndarray,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    new_counts: np.ndarray,
    *,
    replicates: int = DEFAULT_NULL_REPLICATES,
    seed: int = 0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each class present on both sides: ``(k, s_k / N_k as (D,), (B, D) simulated clean new-batch means)``.

    Args:
        ref_sums: ``(K, D)`` reference class sums; ``ref_counts``: ``(K,)`` their counts.
        pool_x: ``(M, D)`` reference rows; ``pool_y``: ``(M,)`` their classes under the same label source.
        new_counts: ``(K,)`` class counts of the incoming batch.
    """
    rng = np.random.default_rng(seed)
    per_class, shared = _residuals(pool_x, pool_y, ref_sums.shape[0])
    for k in np.flatnonzero((np.asarray(ref_counts) > 0) & (np.asarray(new_counts) > 0)):
        residuals = per_class[k] if per_class[k].shape[0] >= MIN_POOL_ROWS else shared
        m = residuals.shape[0]
        if m < 2:
            raise ResqueInputError(
                "null: the fingerprint's calibration pool has fewer than 2 rows per class; recompute the fingerprint "
                "with more reference data (or a larger sample_size)"
            )
        centre = ref_sums[k] / ref_counts[k]
        weights = rng.poisson(new_counts[k] / m, size=(replicates, m)) / new_counts[k]
        weights += rng.standard_normal((replicates, m)) / np.sqrt((m - 1) * ref_counts[k])
        yield int(k), centre, centre + weights @ residuals


def null_resque_dist(
    ref_sums: np.ndarray,
    ref_counts: np.ndarray,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    new_counts: np.ndarray,
    *,
    replicates: int = DEFAULT_NULL_REPLICATES,
    seed: int = 0,
) -> np.ndarray:
    """``(B,)`` RESQUE_dist between the reference and simulated unshifted batches with class counts ``new_counts``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(1.0, 1.0, size=(4000, 16)); y = rng.integers(0, 4, 4000)
    >>> sums = np.stack([x[y == k].sum(0) for k in range(4)]); counts = np.bincount(y)
    >>> small = null_resque_dist(sums, counts, x[:1000], y[:1000], np.full(4, 25), replicates=200)
    >>> large = null_resque_dist(sums, counts, x[:1000], y[:1000], np.full(4, 2500), replicates=200)
    >>> bool(np.median(small) > 3 * np.median(large))  # the null shrinks with the batch size
    True
    """
    angles = np.zeros((replicates, 0))
    for _, centre, means in simulate_class_means(
        ref_sums, ref_counts, pool_x, pool_y, new_counts, replicates=replicates, seed=seed
    ):
        cos = (means @ centre) / (np.linalg.norm(means, axis=1) * np.linalg.norm(centre))
        angles = np.column_stack([angles, np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi])
    if angles.shape[1] == 0:
        raise ResqueInputError("null: no class has samples on both sides")
    return angles.mean(axis=1)


def null_mmd(
    ref_sum: np.ndarray, ref_count: int, pool_x: np.ndarray, n_new: int, *, replicates: int = 200, seed: int = 0
) -> np.ndarray:
    """``(B,)`` linear MMD^2 between the reference mean and simulated unshifted batches of ``n_new`` samples."""
    sims = simulate_class_means(
        ref_sum[None, :], np.array([ref_count]), pool_x, np.zeros(pool_x.shape[0], np.int64), np.array([n_new]),
        replicates=replicates, seed=seed,
    )  # fmt: skip
    _, centre, means = next(sims)
    return ((means - centre) ** 2).sum(axis=1)


def null_mean_drop(
    pool_values: np.ndarray, ref_mean: float, ref_n: int, n_new: int, *, replicates: int = 1000, seed: int = 0
) -> np.ndarray:
    """``(B,)`` ``ref_mean - mean of n_new clean values`` (confidence drop, accuracy drop) under no shift.

    The new side is a bootstrap draw of ``n_new`` pool values; the reference mean's own sampling noise (``ref_n``
    values) is added as Gaussian noise.
    """
    v = np.asarray(pool_values, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or n_new < 1:
        raise ResqueInputError("null: the calibration pool holds no values for this signal")
    rng = np.random.default_rng(seed)
    counts = rng.poisson(n_new / v.size, size=(replicates, v.size)).astype(np.float64)
    ref = ref_mean + rng.standard_normal(replicates) * v.std(ddof=1) / np.sqrt(max(ref_n, 1))
    return ref - (v.mean() + counts @ (v - v.mean()) / n_new)


@dataclass(frozen=True)
class NullCheck:
    """A signal against its calibrated null: ``detected`` when ``value`` exceeds the ``1 - alpha`` quantile."""

    value: float
    quantile: float
    p_value: float
    alpha: float
    n_replicates: int

    @property
    def detected(self) -> bool:
        return self.p_value < self.alpha

    def to_dict(self) -> dict:
        return {
            "value": self.value, "null_quantile": self.quantile, "p_value": self.p_value, "alpha": self.alpha,
            "detected": self.detected, "null_replicates": self.n_replicates,
        }  # fmt: skip


def check_against(value: float, null: np.ndarray, alpha: float = DEFAULT_ALPHA) -> NullCheck:
    """Compare ``value`` with ``(B,)`` null samples (one-sided, large is shifted).

    ``p = (1 + #{null >= value}) / (1 + B)``: never 0, so a finite null cannot claim more than it saw.

    >>> c = check_against(0.5, np.linspace(0.0, 0.4, 999), alpha=0.01)
    >>> c.detected, round(c.p_value, 3)
    (True, 0.001)
    """
    null = np.asarray(null, np.float64)
    null = null[np.isfinite(null)]
    if null.size == 0:
        raise ResqueInputError("null: no finite null samples")
    p = (1.0 + float((null >= value).sum())) / (1.0 + null.size)
    return NullCheck(float(value), float(np.quantile(null, 1.0 - alpha)), p, float(alpha), int(null.size))
