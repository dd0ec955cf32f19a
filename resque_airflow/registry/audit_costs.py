"""What the audit view derives from a model's gate records: predicted against measured cost, and which classes moved.

Pure functions over :class:`~resque_airflow.registry.audit.GateRecord` lists (no MLflow calls):

- :func:`cost_pairs`: one row per gate run that predicted or measured a retraining cost, in the metric most runs
  have on both sides, with whether the measured cost fell inside the predicted interval;
- :func:`class_moves`: one gate run's per-class angles, largest first, with the change since the model's previous
  gate run and a "moved" flag (angle above the run's null quantile, else above its reuse threshold).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from resque_airflow.registry import names
from resque_airflow.registry.audit import GateRecord


def _pair_metric(records: Sequence[GateRecord]) -> str | None:
    """The cost metric to chart: the one most runs have on both sides, else the one most runs predicted."""
    both: dict[str, int] = {}
    either: dict[str, int] = {}
    for r in records:
        for row in r.cost_comparison():
            either[row["metric"]] = either.get(row["metric"], 0) + 1
            if row["predicted"] is not None and row["measured"] is not None:
                both[row["metric"]] = both.get(row["metric"], 0) + 1
    counts = both or either
    if not counts:
        return None
    order = {m: i for i, m in enumerate(names.COST_METRICS)}
    return max(counts, key=lambda m: (counts[m], -order.get(m, 99)))


def cost_pairs(records: Sequence[GateRecord], metric: str | None = None) -> dict[str, Any] | None:
    """Predicted against measured cost of ``metric`` (default: :func:`_pair_metric`) over the model's gate runs.

    Returns ``None`` when no run predicted or measured a cost; else ``metric``, ``rows`` (oldest first: run_id,
    start_time, decision, predicted, low, high, measured, censored, ratio, inside, basis) and a summary: ``n_pairs``,
    ``n_inside`` (measured within the predicted interval) and ``median_ratio`` (measured / predicted).
    """
    metric = metric or _pair_metric(records)
    if metric is None:
        return None
    rows = []
    for r in records:
        row = next((c for c in r.cost_comparison() if c["metric"] == metric), None)
        if row is None:
            continue
        pred, got, low, high = row["predicted"], row["measured"], row["low"], row["high"]
        latest = r.latest_measured()
        censored = r.measured_back.get(names.CENSORED_METRIC)
        basis = (r.prediction or {}).get("basis") if (r.prediction or {}).get("cost_metric") == metric else None
        rows.append(
            {
                "run_id": r.run_id,
                "start_time": r.start_time,
                "decision": r.decision,
                "predicted": pred,
                "low": low,
                "high": high,
                "measured": got,
                "censored": (censored >= 0.5) if censored is not None else (latest.censored if latest else None),
                "ratio": got / pred if got is not None and pred else None,
                "inside": None if got is None or low is None or high is None else low <= got <= high,
                "basis": basis,
            }
        )
    pairs = [row for row in rows if row["ratio"] is not None]
    return {
        "metric": metric,
        "rows": rows,
        "n_pairs": len(pairs),
        "n_inside": sum(1 for row in rows if row["inside"]),
        "median_ratio": statistics.median(row["ratio"] for row in pairs) if pairs else None,
    }


def _previous(records: Sequence[GateRecord], record: GateRecord) -> GateRecord | None:
    """The model's gate run before ``record`` that has per-class angles (records oldest first)."""
    ids = [r.run_id for r in records]
    if record.run_id not in ids:
        return None
    earlier = [r for r in records[: ids.index(record.run_id)] if r.angles]
    return earlier[-1] if earlier else None


def moved_threshold(record: GateRecord) -> tuple[float | None, str]:
    """The line a class's angle must cross to count as moved, and what it is: the run's null quantile (calibrated
    runs), else its reuse threshold."""
    if record.null_quantile is not None:
        return record.null_quantile, "null quantile"
    return record.thresholds.get("reuse"), "reuse threshold"


def class_moves(records: Sequence[GateRecord], record: GateRecord) -> dict[str, Any] | None:
    """Which classes of ``record`` moved: its per-class angles, largest first, against the previous gate run.

    ``None`` without per-class angles. Rows: ``class``, ``angle``, ``previous`` (the angle in the model's previous
    gate run with angles), ``change``, ``moved``. The line (``threshold``) is the score's null quantile at this batch
    size: a class's own angle is noisier than the mean, so "moved" flags where to look, not a test per class.
    """
    items = [c for c in (record.per_class or []) if c.get("angle") is not None]
    if not items:
        return None
    prev = _previous(records, record)
    line, line_kind = moved_threshold(record)
    rows = []
    for c in sorted(items, key=lambda c: -c["angle"]):
        before = prev.angles.get(c["class"]) if prev else None
        rows.append(
            {
                "class": c["class"],
                "angle": c["angle"],
                "previous": before,
                "change": None if before is None else c["angle"] - before,
                "moved": line is not None and c["angle"] > line,
            }
        )
    return {
        "rows": rows,
        "threshold": line,
        "threshold_kind": line_kind,
        "previous_run_id": prev.run_id if prev else None,
        "previous_time": prev.start_time if prev else None,
        "n_moved": sum(1 for row in rows if row["moved"]),
    }
