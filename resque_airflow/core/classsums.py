"""Class-wise feature sums: the mergeable accumulator at the heart of RESQUE_dist."""

from __future__ import annotations

import numpy as np

from resque_airflow.core.accumulator import Mergeable
from resque_airflow.errors import ResqueInputError


def check_labels(labels: np.ndarray, num_classes: int, n: int, *, what: str = "labels") -> np.ndarray:
    """Return ``labels`` as ``(n,)`` int64, or raise naming the problem.

    Accepts any integer dtype, and floats that hold whole numbers (Parquet often stores labels as float).
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ResqueInputError(f"{what}: expected shape ({n},) to match the features, got {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise ResqueInputError(f"{what}: expected integer class indices, got non-integer floats")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise ResqueInputError(f"{what}: expected integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = np.unique(y[(y < 0) | (y >= num_classes)])[:5].tolist()
        raise ResqueInputError(
            f"{what}: values {bad} are outside the fingerprint's classes 0..{num_classes - 1}; "
            "map the labels to the reference classes, or score with labels='predicted' or 'none'"
        )
    return y


def check_features(features: np.ndarray, dim: int | None = None, *, what: str = "features") -> np.ndarray:
    """Return ``features`` as a 2-D float array, or raise naming the problem (rank, width, NaN/inf)."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ResqueInputError(f"{what}: expected a 2-D (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ResqueInputError(f"{what}: expected {dim} columns, got {x.shape[1]}")
    if x.dtype.kind != "f":
        raise ResqueInputError(f"{what}: expected floating-point values, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ResqueInputError(f"{what}: contains NaN or infinite values; clean or drop those rows first")
    return x


class ClassSums(Mergeable):
    """Class-wise sums and counts of ``D``-dimensional features over ``K`` classes.

    Sums are kept in float64 whatever the input dtype (float32 accumulation drifts by ~1.6% of the score).
    Accumulators over disjoint batches, shards or workers merge exactly with ``+`` / ``+=`` / ``sum``, in any order
    (the protocol of :mod:`resque_airflow.core.accumulator`); both sides must have the same ``K`` and ``D``.

    Attributes:
        sums: ``(K, D)`` float64, the sum of the features of each class.
        counts: ``(K,)`` int64, the number of samples of each class.

    Example:
        >>> import numpy as np
        >>> a = ClassSums(num_classes=2, dim=3)
        >>> _ = a.update(np.ones((4, 3), np.float32), np.array([0, 0, 1, 1]))
        >>> b = ClassSums(2, 3).update(np.full((1, 3), 2.0), np.array([1]))
        >>> a += b
        >>> a.counts.tolist()
        [2, 3]
        >>> a.sums[1].tolist()
        [4.0, 4.0, 4.0]
        >>> a.get()[1].round(3).tolist()  # class means
        [1.333, 1.333, 1.333]
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        if int(num_classes) < 1 or int(dim) < 1:
            raise ResqueInputError(f"ClassSums: num_classes and dim must be >= 1, got {num_classes}, {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.sums = np.zeros((self.num_classes, self.dim), dtype=np.float64)
        self.counts = np.zeros(self.num_classes, dtype=np.int64)

    @classmethod
    def from_arrays(cls, sums: np.ndarray, counts: np.ndarray) -> ClassSums:
        """Rebuild an accumulator from saved ``(K, D)`` sums and ``(K,)`` counts."""
        sums = np.asarray(sums, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        if sums.ndim != 2 or counts.shape != (sums.shape[0],):
            raise ResqueInputError(f"ClassSums: sums {sums.shape} and counts {counts.shape} do not match")
        out = cls(sums.shape[0], sums.shape[1])
        out.sums[:] = sums
        out.counts[:] = counts
        return out

    def update(self, features: np.ndarray, labels: np.ndarray | None = None) -> ClassSums:
        """Add ``(N, D)`` features with their ``(N,)`` integer labels (all class 0 when ``labels`` is None).

        Returns ``self`` so calls can be chained.
        """
        x = check_features(features, self.dim)
        n = x.shape[0]
        if n == 0:
            return self
        if labels is None:
            if self.num_classes != 1:
                raise ResqueInputError("labels: required when num_classes > 1")
            self.sums[0] += x.sum(axis=0, dtype=np.float64)
            self.counts[0] += n
            return self
        y = check_labels(labels, self.num_classes, n)
        # A one-hot matrix product is ~140x faster than np.add.at and exact in float64.
        onehot = np.zeros((self.num_classes, n), dtype=np.float64)
        onehot[y, np.arange(n)] = 1.0
        self.sums += onehot @ x.astype(np.float64, copy=False)
        self.counts += np.bincount(y, minlength=self.num_classes)
        return self

    def get(self) -> np.ndarray:
        """Class means, ``(K, D)`` float64; rows of empty classes are NaN."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.counts[:, None]

    @property
    def n(self) -> int:
        """Total number of samples seen."""
        return int(self.counts.sum())

    def _signature(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "dim": self.dim}

    def _merge(self, other: ClassSums) -> None:
        self.sums += other.sums
        self.counts += other.counts

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ClassSums)
            and np.array_equal(self.sums, other.sums)
            and np.array_equal(self.counts, other.counts)
        )

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"ClassSums(num_classes={self.num_classes}, dim={self.dim}, n={self.n})"
