"""Fit the cold-start cost prior (``resque_airflow/core/cost_prior.json``) on the evidence runs.

Usage::

    python benchmarks/fit_prior.py [--runs docs/evidence/dist_runs.csv ...] [--out resque_airflow/core/cost_prior.json]

Each uncensored distribution-shift run (fine-tuning and rebuilding both reached the target) gives one row: the
prior's calibrated signals (:data:`resque_airflow.core.prior.PRIOR_SIGNALS`: RESQUE over its null quantile, and
the relative accuracy drop) and the target ``steps_to_target / rebuild_steps_to_target``. Censored runs are left
out: their cost is only a lower bound (``docs/THRESHOLDS.md`` says how many). The model is the product's own
:class:`~resque_airflow.core.costmodel.CostModel` (sign-constrained ridge on ``log1p``, jackknife interval).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resque_airflow.core.costmodel import CostModel  # noqa: E402
from resque_airflow.core.prior import PRIOR_SIGNALS, transfer_signals  # noqa: E402

DEFAULT_RUNS = (REPO / "docs/evidence/dist_runs.csv",)
DEFAULT_OUT = REPO / "resque_airflow/core/cost_prior.json"


def _float(v: str | None) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except ValueError:
        return None


def prior_rows(paths: list[Path]) -> tuple[list[dict], list[float], dict]:
    """``(signals rows, relative costs, counts)`` of every usable run in the CSVs at ``paths``."""
    rows, target = [], []
    counts = {"runs": 0, "censored": 0, "uncalibrated": 0}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                counts["runs"] += 1
                steps, rebuild = _float(r.get("steps_to_target")), _float(r.get("rebuild_steps_to_target"))
                if _float(r.get("censored")) or _float(r.get("rebuild_censored")) or not rebuild or steps is None:
                    counts["censored"] += 1
                    continue
                signals = transfer_signals(
                    _float(r.get("resque_dist")) or 0.0, _float(r.get("null_q")), _float(r.get("accuracy")),
                    _float(r.get("reference_accuracy")),
                )  # fmt: skip
                if signals["excess"] is None:
                    counts["uncalibrated"] += 1
                    continue
                rows.append(signals)
                target.append(steps / rebuild)
    return rows, target, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", default=list(DEFAULT_RUNS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    rows, target, counts = prior_rows(args.runs)
    if len(rows) < 10:
        print(f"fit_prior: only {len(rows)} usable runs in {args.runs} ({counts}); need 10", file=sys.stderr)
        return 2
    model = CostModel(signals=PRIOR_SIGNALS).fit(rows, target)
    out = model.to_dict() | {
        "fitted_on": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in args.runs],
        "counts": counts | {"used": len(rows)},
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"out": str(args.out), **out["counts"], "explain": model.explain()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
