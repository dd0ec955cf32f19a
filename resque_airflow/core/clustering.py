"""k-means (Lloyd's algorithm from given centres) and the adjusted Rand index, for RESQUE_task (DESIGN.md 2.2).

These are scikit-learn's ``KMeans(algorithm="lloyd", n_init=1, init=centres)`` and ``adjusted_rand_score``, step for
step: the same centring of the data, tolerance, convergence tests, empty-cluster relocation and final E-step, and
the same pair-counting formula in exact integers (``tests/test_clustering.py`` checks labels, iterations and scores
against scikit-learn). They are written out because every gate computes the separability companion signal, and
importing scikit-learn for it cost 1.5 s and ~120 MB of peak memory per gate (docs/PERFORMANCE.md), more than the
k-means itself by two orders of magnitude.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_ITER = 300
DEFAULT_TOL = 1e-4
# Up to this many clusters the cluster sums are one one-hot matrix product; beyond, a sort and a grouped sum.
ONE_HOT_MAX_CLUSTERS = 64


def lloyd(
    x: np.ndarray, centers: np.ndarray, *, max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means by Lloyd's iterations from ``centers``.

    Args:
        x: ``(N, D)`` float64 samples.
        centers: ``(K, D)`` initial centres.
        tol: relative tolerance: iterations stop when the centres' total squared shift is at most ``tol`` times the
            mean per-feature variance of ``x``, or when no label changes.

    Returns:
        ``(labels, centers, n_iter)``: ``(N,)`` int64 cluster of each sample, ``(K, D)`` final centres, iterations.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    x = x - mean  # as scikit-learn does: distances are exact to more digits around the mean
    centers = np.asarray(centers, np.float64) - mean
    tol_abs = float(np.mean(np.var(x, axis=0))) * tol
    labels_old = np.full(x.shape[0], -1, np.int64)
    strict = False
    for i in range(max_iter):  # noqa: B007 (i is the iteration count after the loop)
        labels = _assign(x, centers)
        new = _update(x, centers, labels)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if shift <= tol_abs:
            break
        labels_old = labels
    if not strict:  # the labels of the last centres, which the loop has not computed
        labels = _assign(x, centers)
    return labels, centers + mean, i + 1


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The nearest centre of each sample: argmin of ``|c|^2 - 2 x.c`` (``|x|^2`` is the same for every centre)."""
    return np.argmin((centers * centers).sum(axis=1)[None, :] - 2.0 * (x @ centers.T), axis=1).astype(np.int64)


def _update(x: np.ndarray, old: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The means of the clusters; an empty cluster takes the sample farthest from its own centre."""
    k = old.shape[0]
    if k <= ONE_HOT_MAX_CLUSTERS:  # one (K, N) x (N, D) GEMM: K N D multiply-adds, BLAS-fast for a few clusters
        sums = (labels[None, :] == np.arange(k)[:, None]).astype(np.float64) @ x
    else:  # rows grouped by cluster and summed per group: O(N D) for any K, at the price of a copy of x
        sums = np.zeros_like(old)
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        sums[present] = np.add.reduceat(x[order], starts, axis=0)
    weight = np.bincount(labels, minlength=k).astype(np.float64)
    empty = np.flatnonzero(weight == 0)
    if empty.size:
        far = np.argpartition(((x - old[labels]) ** 2).sum(axis=1), -empty.size)[: -empty.size - 1 : -1]
        for cluster, sample in zip(empty, far, strict=True):
            sums[labels[sample]] -= x[sample]
            sums[cluster] = x[sample]
            weight[cluster] = 1.0
            weight[labels[sample]] -= 1.0
    filled = weight > 0
    sums[filled] *= (1.0 / weight[filled])[:, None]
    return sums


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """The adjusted Rand index of two labellings of the same ``(N,)`` samples (1: identical partitions, ~0: chance).

    >>> adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
    1.0
    >>> round(adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])), 3)
    -0.5
    """
    _, a = np.unique(np.asarray(labels_true), return_inverse=True)
    _, b = np.unique(np.asarray(labels_pred), return_inverse=True)
    n = int(a.size)
    rows_n, cols_n = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    table = np.bincount(a.ravel() * cols_n + b.ravel(), minlength=rows_n * cols_n).reshape(rows_n, cols_n)
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    squares = int((table**2).sum())
    # The pair confusion matrix: pairs together in both (tp), in one only (fp, fn), in neither (tn); exact integers.
    tp = squares - n
    fp = int((table @ cols).sum()) - squares
    fn = int((table.T @ rows).sum()) - squares
    tn = n * n - fp - fn - squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
