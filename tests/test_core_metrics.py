"""RESQUE_dist, RESQUE_task and ClassSums against brute-force re-implementations of the reference procedure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from resque_airflow.core import ClassSums, ResqueInputError, resque_dist, resque_task
from resque_airflow.core.summary import FeatureSummary, companion_signals


def reference_procedure(fo, yo, fs, ys) -> tuple[float, dict[int, float]]:
    """The published procedure, in plain float64 loops: per class sum, normalise, arccos of clipped dot, / pi."""
    angles = {}
    for k in sorted(set(yo.tolist()) & set(ys.tolist())):
        s = np.zeros(fo.shape[1])
        for row in fo[yo == k]:
            s += row
        t = np.zeros(fs.shape[1])
        for row in fs[ys == k]:
            t += row
        s /= np.linalg.norm(s)
        t /= np.linalg.norm(t)
        angles[k] = float(np.arccos(np.clip(np.dot(s, t), -1, 1)) / np.pi)
    return float(np.mean(list(angles.values()))), angles


def uneven_data(seed: int, n: int, k: int, d: int, missing: int | None = None):
    rng = np.random.default_rng(seed)
    p = rng.permutation(np.arange(1, k + 1) ** 2 / np.sum(np.arange(1, k + 1) ** 2))  # uneven, none empty
    y = rng.choice(k, n, p=p)
    if missing is not None:
        y[y == missing] = (missing + 1) % k
    f = rng.normal(size=(n, d)) + y[:, None] * 0.3
    return f, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resque_dist_equals_reference_procedure(seed):
    fo, yo = uneven_data(seed, 700, 7, 33)
    fs, ys = uneven_data(seed + 100, 401, 7, 33, missing=3)
    fs = fs * 1.7 + 0.4  # a real shift
    score = resque_dist(ClassSums(7, 33).update(fo, yo), ClassSums(7, 33).update(fs, ys))
    ref, angles = reference_procedure(fo, yo, fs, ys)
    assert abs(score.value - ref) < 1e-9
    assert score.per_class.keys() == angles.keys()
    for k, a in angles.items():
        assert abs(score.per_class[k] - a) < 1e-9
    assert 3 not in score.classes_compared and score.classes_missing == [3]
    assert 0.0 <= score.value <= 1.0


def test_float32_input_accumulates_in_float64():
    fo, yo = uneven_data(5, 2000, 3, 64)
    cs32 = ClassSums(3, 64).update(fo.astype(np.float32), yo)
    cs64 = ClassSums(3, 64).update(fo.astype(np.float32).astype(np.float64), yo)
    assert cs32.sums.dtype == np.float64 and cs32.counts.dtype == np.int64
    np.testing.assert_array_equal(cs32.sums, cs64.sums)


def test_merging_shards_in_any_order_equals_one_pass():
    f, y = uneven_data(3, 900, 5, 16)
    whole = ClassSums(5, 16).update(f, y)
    shards = [ClassSums(5, 16).update(f[i : i + 200], y[i : i + 200]) for i in range(0, 900, 200)]
    for order in itertools.permutations(range(len(shards))):
        merged = ClassSums(5, 16)
        for i in order:
            merged += shards[i]
        np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(merged.counts, whole.counts)
    total = shards[0] + shards[1]
    assert total.n == 400 and shards[0].n == 200  # + does not mutate


def test_identical_data_scores_zero_and_opposite_scores_one():
    f, y = uneven_data(0, 300, 3, 8)
    a = ClassSums(3, 8).update(np.abs(f), y)
    assert resque_dist(a, a).value == pytest.approx(0.0, abs=1e-7)
    b = ClassSums(3, 8).update(-np.abs(f), y)
    assert resque_dist(a, b).value == pytest.approx(1.0, abs=1e-7)


def test_bad_inputs_name_the_problem():
    cs = ClassSums(3, 4)
    with pytest.raises(ResqueInputError, match="NaN"):
        cs.update(np.full((2, 4), np.nan), np.array([0, 1]))
    with pytest.raises(ResqueInputError, match=r"outside the fingerprint's classes 0\.\.2"):
        cs.update(np.ones((2, 4)), np.array([0, 7]))
    with pytest.raises(ResqueInputError, match="expected 4 columns"):
        cs.update(np.ones((2, 5)), np.array([0, 1]))
    with pytest.raises(ResqueInputError, match="integer"):
        cs.update(np.ones((2, 4)), np.array(["a", "b"]))
    with pytest.raises(ResqueInputError, match="no class has samples on both sides"):
        resque_dist(ClassSums(3, 4).update(np.ones((1, 4)), [0]), ClassSums(3, 4).update(np.ones((1, 4)), [1]))
    zero = ClassSums(3, 4).update(np.zeros((2, 4)), np.array([0, 1]))
    ok = ClassSums(3, 4).update(np.ones((2, 4)), np.array([0, 1]))
    with pytest.raises(ResqueInputError):
        resque_dist(zero, ok)
    half = ClassSums(3, 4).update(np.vstack([np.zeros(4), np.ones(4)]), np.array([0, 1]))
    score = resque_dist(half, ok)
    assert score.classes_degenerate == [0] and score.classes_compared == [1]


@pytest.mark.parametrize("init", ["centroids", "k-means++"])
def test_resque_task_equals_direct_sklearn(init):
    f, y = uneven_data(11, 600, 4, 10)
    got = resque_task(f, y, init=init, seed=3)
    if init == "centroids":
        start = np.stack([f[y == k].mean(0) for k in range(4)])
        km = KMeans(n_clusters=4, init=start, n_init=1, random_state=3)
    else:
        km = KMeans(n_clusters=4, init="k-means++", n_init=1, random_state=3)
    ari = adjusted_rand_score(y, km.fit_predict(f))
    assert got.ari == pytest.approx(ari, abs=1e-12)
    assert got.value == pytest.approx(1 - ari, abs=1e-12)


def test_resque_task_stratified_subsample_keeps_every_class():
    f, y = uneven_data(2, 5000, 6, 5)
    got = resque_task(f, y + 10, max_samples=300)  # labels need not start at 0
    assert got.n_samples <= 300 and got.num_classes == 6
    with pytest.raises(ResqueInputError, match="at least 2 classes"):
        resque_task(f[:10], np.zeros(10, int))


def test_summary_merge_and_signals():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 6)).astype(np.float32) + 1
    y = rng.integers(0, 3, 1000)
    logits = np.eye(3)[y] * 4.0
    ref = FeatureSummary(3, 6, sample_size=200)
    ref.update(x, logits, y)
    parts = [FeatureSummary(3, 6, sample_size=200) for _ in range(2)]
    parts[0].update(x[:500] * 2, logits[:500], y[:500])
    parts[1].update(x[500:] * 2, logits[500:], y[500:])
    parts[0] += parts[1]
    assert parts[0].n == 1000 and parts[0].sample_x.shape == (200, 6)
    sig = companion_signals(ref, parts[0])
    assert sig["acc_drop"] == pytest.approx(0.0)
    assert sig["mmd"] > 0 and 0 < sig["ks"] <= 1
    assert sig["resque_dist"] == pytest.approx(sig["resque_dist_predicted"])  # labels == predictions here
    assert sig["separability"] is not None


@pytest.mark.parametrize("ties", [False, True])
def test_ks_mean_equals_scipy_per_feature(ties):
    """The vectorised statistic equals scipy's ks_2samp feature by feature, with ties (ReLU zeros, rounding)."""
    from scipy.stats import ks_2samp

    from resque_airflow.core.metrics import ks_mean

    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, (300, 24))
    b = rng.normal(0.2, 1.3, (170, 24))
    if ties:
        a, b = np.maximum(np.round(a, 1), 0.0), np.maximum(np.round(b, 1), 0.0)
    expected = np.mean([ks_2samp(a[:, j], b[:, j]).statistic for j in range(a.shape[1])])
    assert ks_mean(a, b) == pytest.approx(expected, abs=1e-12)
    assert ks_mean(a, a) == 0.0
