"""The shipped defaults are pinned to the committed benchmark outputs they were derived from.

If a benchmark is rerun and its outputs committed, these fail until the defaults are re-derived (or the other way
round): the two cannot drift apart silently.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, load_benchmark

from resque_airflow.core.costmodel import CostModel
from resque_airflow.core.decision import DEFAULT_THRESHOLDS
from resque_airflow.core.prior import PRIOR_PATH, PRIOR_SIGNALS, load_prior


def test_the_cost_prior_is_the_fit_of_the_committed_evidence_runs():
    shipped = json.loads(PRIOR_PATH.read_text())
    fit_prior = load_benchmark("fit_prior")
    paths = [REPO / p for p in shipped["fitted_on"]]
    rows, target, counts = fit_prior.prior_rows(paths)
    assert counts | {"used": len(rows)} == shipped["counts"]
    refit = CostModel(signals=PRIOR_SIGNALS).fit(rows, target).to_dict()
    for key in ("coef", "mean", "scale", "loo_residuals"):
        np.testing.assert_allclose(refit[key], shipped[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert refit["intercept"] == pytest.approx(shipped["intercept"], rel=1e-9)
    assert load_prior().signals == tuple(shipped["signals"])


def test_the_fixed_thresholds_are_the_committed_derivation():
    derived = json.loads((REPO / "docs/evidence/thresholds.json").read_text())
    assert DEFAULT_THRESHOLDS["dist"].reuse == pytest.approx(derived["reuse_threshold"], abs=5e-5)
    assert DEFAULT_THRESHOLDS["dist"].rebuild == derived["rebuild_threshold"]
