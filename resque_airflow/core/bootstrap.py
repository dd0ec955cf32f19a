"""Poisson-bootstrap replicates of class sums: intervals on RESQUE_dist that merge across batches and shards.

Each sample enters replicate ``b`` with a weight drawn from Poisson(1) (Hanley & MacGibbon's Poisson bootstrap),
so every replicate is itself a class-sum accumulator and replicates add across shards exactly like the sums do.
The weights are a function of the sample's own feature values (a hash of its bytes), never of its position in the
stream: the same samples give the same replicates whether they arrive in one pass or as shards merged in any order.

The interval reported is a *basic* (reflected) bootstrap interval on squared angles (:func:`basic_interval`):
RESQUE_dist is biased upward by sampling noise (noise only ever adds angle), and a replicate adds that noise once
more, so the plain percentile interval sits above the population value; reflecting it removes the bias
(``tests/test_core_calibration.py`` measures the coverage).
"""

from __future__ import annotations

import numpy as np

from resque_airflow.core.accumulator import Mergeable
from resque_airflow.core.classsums import ClassSums, check_features, check_labels
from resque_airflow.errors import ResqueInputError

DEFAULT_REPLICATES = 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Poisson(1) CDF up to 12 (P(X > 12) < 1e-9): weights by inverse-CDF lookup of a uniform.
_POISSON1_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(13)])


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_hashes(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit hash of each row's float32 bytes, ``(N,)`` uint64: the same row always hashes the same."""
    x = np.ascontiguousarray(np.asarray(features, np.float32))
    words = x.view(np.uint32).astype(np.uint64)
    mult = _splitmix64(np.arange(1, x.shape[1] + 1, dtype=np.uint64) * _GOLDEN + np.uint64(seed)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return _splitmix64((words * mult).sum(axis=1, dtype=np.uint64))


def poisson_weights(features: np.ndarray, replicates: int, seed: int = 0) -> np.ndarray:
    """``(N, B)`` float64 Poisson(1) weights of each row in each of ``replicates`` replicates, from the row's bytes.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(20000, 4)).astype(np.float32)
    >>> w = poisson_weights(x, 8)
    >>> w.shape, round(float(w.mean()), 1), round(float(w.var()), 1)
    ((20000, 8), 1.0, 1.0)
    >>> bool((poisson_weights(x[::-1], 8)[::-1] == w).all())  # position in the stream does not matter
    True
    """
    h = row_hashes(features, seed)
    b = np.arange(1, replicates + 1, dtype=np.uint64) * _GOLDEN
    with np.errstate(over="ignore"):
        u = (_splitmix64(h[:, None] + b[None, :]) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float64)


class ReplicateSums(Mergeable):
    """``B`` Poisson-bootstrap replicates of a :class:`ClassSums`: ``(B, K, D)`` float64 sums, ``(B, K)`` weights.

    The accumulator protocol of :mod:`resque_airflow.core.accumulator`: ``update`` returns self, ``+``/``+=`` merge.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
        >>> y = np.array([0, 1] * 5)
        >>> one = ReplicateSums(2, 3, replicates=4).update(x, y)
        >>> two = ReplicateSums(2, 3, replicates=4).update(x[5:], y[5:]) + ReplicateSums(2, 3, 4).update(x[:5], y[:5])
        >>> bool(np.allclose(one.sums, two.sums)), one.sums.shape
        (True, (4, 2, 3))
    """

    def __init__(self, num_classes: int, dim: int, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> None:
        if int(replicates) < 1:
            raise ResqueInputError(f"replicates: expected >= 1, got {replicates}")
        self.num_classes, self.dim, self.replicates, self.seed = int(num_classes), int(dim), int(replicates), seed
        self.sums = np.zeros((self.replicates, self.num_classes, self.dim), np.float64)
        self.weights = np.zeros((self.replicates, self.num_classes), np.float64)

    def update(self, features: np.ndarray, labels: np.ndarray | None = None) -> ReplicateSums:
        """Add ``(N, D)`` features with ``(N,)`` labels (all class 0 when None)."""
        x = check_features(features, self.dim)
        if x.shape[0] == 0:
            return self
        y = np.zeros(x.shape[0], np.int64) if labels is None else check_labels(labels, self.num_classes, x.shape[0])
        w = poisson_weights(x, self.replicates, self.seed)  # (N, B)
        x64 = x.astype(np.float64, copy=False)
        # One (B, n_k) x (n_k, D) GEMM per class present: B * N * D multiply-adds in all, where a single GEMM against
        # one-hot-weighted rows would spend K times that on zeros.
        for k in np.unique(y):
            rows = y == k
            wk = w[rows]
            self.sums[:, k, :] += wk.T @ x64[rows]
            self.weights[:, k] += wk.sum(axis=0)
        return self

    def replicate(self, b: int) -> ClassSums:
        """Replicate ``b`` as a :class:`ClassSums` (counts are the rounded Poisson weights: > 0 where present)."""
        return ClassSums.from_arrays(self.sums[b], np.rint(self.weights[b]).astype(np.int64))

    def _signature(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "dim": self.dim, "replicates": self.replicates, "seed": self.seed}

    def _merge(self, other: ReplicateSums) -> None:
        self.sums += other.sums
        self.weights += other.weights

    @classmethod
    def from_arrays(cls, sums: np.ndarray, weights: np.ndarray, seed: int = 0) -> ReplicateSums:
        sums, weights = np.asarray(sums, np.float64), np.asarray(weights, np.float64)
        if sums.ndim != 3 or weights.shape != sums.shape[:2]:
            raise ResqueInputError(f"replicates: expected (B, K, D) sums and (B, K) weights, got {sums.shape}, "
                                   f"{weights.shape}")  # fmt: skip
        out = cls(sums.shape[1], sums.shape[2], sums.shape[0], seed)
        out.sums, out.weights = sums.copy(), weights.copy()
        return out


def replicate_angles(reference: ReplicateSums, new: ReplicateSums, classes: list[int]) -> np.ndarray:
    """``(B,)`` RESQUE_dist of each replicate pair, averaged over ``classes`` (the classes the point score used)."""
    if reference.replicates != new.replicates or not classes:
        raise ResqueInputError("replicates: the reference and the new data need the same number of replicates")
    s, t = reference.sums[:, classes, :], new.sums[:, classes, :]
    num = np.einsum("bkd,bkd->bk", s, t)
    den = np.linalg.norm(s, axis=2) * np.linalg.norm(t, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ang = np.where(den > 0, np.arccos(np.clip(num / den, -1.0, 1.0)) / np.pi, np.nan)
    ok = np.isfinite(ang)
    # A replicate in which no compared class drew a sample (tiny batches) has no angle: NaN, left out of the interval.
    return np.where(ok.any(axis=1), np.where(ok, ang, 0.0).sum(axis=1) / np.maximum(ok.sum(axis=1), 1), np.nan)


def basic_interval(value: float, replicates: np.ndarray, coverage: float = 0.9) -> tuple[float, float]:
    """The basic bootstrap interval of an angle ``value`` from its ``(B,)`` replicates, taken on squared angles.

    Sampling noise adds to a small angle in quadrature (``v^2 ~ truth^2 + noise^2``, and a replicate adds the
    noise once more), so the interval reflects the replicates around ``value`` in squared-angle space:
    ``[sqrt(2 v^2 - q_hi^2), sqrt(2 v^2 - q_lo^2)]``, clipped at 0. Far from 0 this is the usual basic interval;
    with no shift at all it reaches down to 0 instead of sitting on the noise floor.

    >>> [round(v, 4) for v in basic_interval(0.10, np.array([0.11, 0.12, 0.13, 0.14]), coverage=0.5)]
    [0.0492, 0.0786]
    >>> basic_interval(0.02, np.array([0.028, 0.029, 0.03]))[0]  # pure noise: the interval reaches 0
    0.0
    """
    r = np.asarray(replicates, np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(r**2, [(1 - coverage) / 2, (1 + coverage) / 2])
    v2 = 2 * float(value) ** 2
    return (float(np.sqrt(max(v2 - hi, 0.0))), float(min(np.sqrt(max(v2 - lo, 0.0)), 1.0)))
