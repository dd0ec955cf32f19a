"""The calibrated null and the bootstrap intervals, against brute force on synthetic representations.

Two synthetic "models" with different representations (a dense ReLU mixture and a sparse, heavy-tailed one) stand
in for real networks here, where thousands of clean batches are cheap to draw; tests/test_calibrated_gate.py runs
the same checks through real ONNX models.
"""

from __future__ import annotations

import numpy as np
import pytest

from resque_airflow.core.bootstrap import ReplicateSums, basic_interval, replicate_angles
from resque_airflow.core.classsums import ClassSums
from resque_airflow.core.metrics import resque_dist
from resque_airflow.core.null import check_against, null_resque_dist

K = 10


class DenseModel:
    """ReLU features of a Gaussian class mixture: 64-d, dense."""

    dim = 64

    def __init__(self, seed: int = 0) -> None:
        self.mu = np.random.default_rng(seed).normal(size=(K, self.dim))

    def draw(self, n: int, rng, shift: np.ndarray | None = None):
        y = rng.integers(0, K, n)
        x = np.maximum(self.mu[y] + 0.8 * rng.standard_normal((n, self.dim)), 0.0)
        if shift is not None:
            x = x + shift[y]
        return x.astype(np.float32), y


class SparseModel:
    """Sparse, heavy-tailed features: 128-d, most entries zero, log-normal magnitudes."""

    dim = 128

    def __init__(self, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.active = rng.random((K, self.dim)) < 0.15
        self.scale = rng.lognormal(0.0, 0.5, (K, self.dim))

    def draw(self, n: int, rng, shift: np.ndarray | None = None):
        y = rng.integers(0, K, n)
        on = self.active[y] & (rng.random((n, self.dim)) < 0.8)
        x = on * self.scale[y] * rng.lognormal(0.0, 0.6, (n, self.dim))
        return x.astype(np.float32), y


def sums(x, y) -> ClassSums:
    return ClassSums(K, x.shape[1]).update(x, y)


DENSE, SPARSE = DenseModel(), SparseModel()


@pytest.mark.parametrize(
    ("model", "n", "batches", "alpha"),
    [
        (DENSE, 100, 200, 0.05), (DENSE, 1000, 200, 0.05), (DENSE, 10_000, 100, 0.05), (DENSE, 1000, 300, 0.01),
        (SPARSE, 100, 200, 0.05), (SPARSE, 10_000, 100, 0.05),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, (DenseModel, SparseModel)) else str(v),
)  # fmt: skip
def test_false_alarm_rate_on_unshifted_batches(model, n, batches, alpha):
    # The null treats the reference sums as a sample too, so its false-alarm rate holds over reference samples:
    # each reference here serves 20 batches. The reference is larger than the batch, as a fingerprint should be
    # (with a batch larger than the reference, the reference's own sampling error dominates; THRESHOLDS.md).
    rng = np.random.default_rng(n + batches)
    alarms = 0
    for b in range(batches):
        if b % 20 == 0:
            ref_x, ref_y = model.draw(max(5000, 2 * n), rng)
            ref = sums(ref_x, ref_y)
            pool_x, pool_y = ref_x[:2000], ref_y[:2000]  # the fingerprint's uniform sample of the same pass
        x, y = model.draw(n, rng)  # held-out clean data: never part of the reference
        new = sums(x, y)
        null = null_resque_dist(
            ref.sums, ref.counts, pool_x, pool_y, new.counts, replicates=250 if alpha >= 0.05 else 600, seed=b
        )
        alarms += check_against(resque_dist(ref, new).value, null, alpha).detected
    assert alarms / batches <= 2 * alpha, f"false-alarm rate {alarms / batches:.3f} at n={n}, alpha={alpha}"


@pytest.mark.parametrize("model", [DenseModel(), SparseModel()], ids=["dense", "sparse"])
def test_null_quantiles_match_brute_force(model):
    rng = np.random.default_rng(7)
    ref_x, ref_y = model.draw(5000, rng)
    ref = sums(ref_x, ref_y)
    n = 400
    brute = np.array([resque_dist(ref, sums(*model.draw(n, rng))).value for _ in range(400)])
    counts = np.bincount(rng.integers(0, K, n), minlength=K)
    null = null_resque_dist(ref.sums, ref.counts, ref_x[:2000], ref_y[:2000], counts, replicates=2000)
    for q in (0.5, 0.9, 0.99):
        assert np.quantile(null, q) == pytest.approx(np.quantile(brute, q), rel=0.08), q


def test_null_shrinks_with_batch_size_as_the_issue_measured():
    # 10 classes, 64-d, 5,000 reference samples, no shift: the median null falls roughly as 1 / sqrt(n).
    model, rng = DenseModel(), np.random.default_rng(3)
    ref_x, ref_y = model.draw(5000, rng)
    ref = sums(ref_x, ref_y)
    med = {
        n: np.median(null_resque_dist(ref.sums, ref.counts, ref_x[:2000], ref_y[:2000], np.full(K, n // K), seed=1))
        for n in (100, 2000, 20_000)
    }
    assert med[100] > med[2000] > med[20_000] > 0


def test_basic_interval_covers_the_population_value():
    model, rng = DenseModel(), np.random.default_rng(5)
    shift = 0.15 * rng.standard_normal((K, model.dim))
    big_a, big_b = model.draw(400_000, rng), model.draw(400_000, rng, shift)
    truth = resque_dist(sums(*big_a), sums(*big_b)).value
    covered, repeats = 0, 100
    for _ in range(repeats):
        (xa, ya), (xb, yb) = model.draw(5000, rng), model.draw(1000, rng, shift)
        value = resque_dist(sums(xa, ya), sums(xb, yb)).value
        ra = ReplicateSums(K, model.dim, replicates=64).update(xa, ya)
        rb = ReplicateSums(K, model.dim, replicates=64).update(xb, yb)
        lo, hi = basic_interval(value, replicate_angles(ra, rb, list(range(K))), coverage=0.9)
        covered += lo <= truth <= hi
    assert 0.80 <= covered / repeats <= 0.97, f"coverage {covered / repeats:.2f} of a nominal 90% interval"


def test_replicates_are_the_same_in_one_pass_or_shards_in_any_order():
    model, rng = DenseModel(), np.random.default_rng(9)
    x, y = model.draw(3000, rng)
    one = ReplicateSums(K, model.dim).update(x, y)
    parts = [ReplicateSums(K, model.dim).update(x[i : i + 700], y[i : i + 700]) for i in range(0, 3000, 700)]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        merged = ReplicateSums(K, model.dim)
        for i in order:
            merged += parts[i]
        np.testing.assert_allclose(merged.sums, one.sums, rtol=1e-12)
        np.testing.assert_array_equal(merged.weights, one.weights)
