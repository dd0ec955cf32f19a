"""Geometry of the audit view's per-model charts, in SVG user units (the templates only place what is computed here).

- :func:`cost_chart`: predicted against measured retraining cost, one point per gate run that has both, with the
  predicted interval as a horizontal bar and the diagonal "measured = predicted";
- :func:`class_heatmap`: the per-class angles of the model's recent gate runs (rows classes, columns runs), so
  that which classes moved, and when, shows at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from resque_airflow.registry.audit import GateRecord
from resque_airflow.registry.audit_fields import per_class
from resque_airflow.ui.charts import _nice_ticks, colour

HEAT_COLOUR = "#c62828"
MAX_HEAT_RUNS = 40
MAX_HEAT_CLASSES = 60


def cost_chart(pairs: dict[str, Any] | None, selected: str | None = None, *, size: int = 420) -> dict[str, Any] | None:
    """The scatter of :func:`~resque_airflow.registry.audit_costs.cost_pairs` (``None`` without a measured pair)."""
    rows = [r for r in (pairs or {}).get("rows", []) if r["predicted"] is not None and r["measured"] is not None]
    if not rows:
        return None
    left, right, top, bottom = 64, 16, 14, 48
    pw, ph = size - left - right, size - top - bottom
    vals = [v for r in rows for v in (r["predicted"], r["measured"], r["low"], r["high"]) if v is not None]
    ticks = _nice_ticks(max([*vals, 1e-9]) * 1.08, n=4)
    top_v = ticks[-1]

    def x_of(v: float) -> float:
        return left + pw * min(max(v, 0.0), top_v) / top_v

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), top_v) / top_v)

    points = []
    for r in rows:
        title = f"{(r['start_time'] or '?').replace('+00:00', 'Z')} | predicted {r['predicted']:.4g}"
        if r["low"] is not None and r["high"] is not None:
            title += f" [{r['low']:.4g}, {r['high']:.4g}]"
        title += f" | measured {r['measured']:.4g}" + (" (target not reached)" if r["censored"] else "")
        points.append(
            {
                "run_id": r["run_id"],
                "x": round(x_of(r["predicted"]), 2),
                "y": round(y_of(r["measured"]), 2),
                "x1": None if r["low"] is None else round(x_of(r["low"]), 2),
                "x2": None if r["high"] is None else round(x_of(r["high"]), 2),
                "colour": colour(r["decision"]),
                "inside": bool(r["inside"]),
                "censored": bool(r["censored"]),
                "selected": r["run_id"] == selected,
                "title": title,
            }
        )
    return {
        "width": size,
        "height": size,
        "left": left,
        "top": top,
        "right_x": left + pw,
        "bottom_y": top + ph,
        "ticks": [{"x": round(x_of(v), 2), "y": round(y_of(v), 2), "label": f"{v:g}"} for v in ticks],
        "diagonal": {"x1": left, "y1": top + ph, "x2": round(x_of(top_v), 2), "y2": round(y_of(top_v), 2)},
        "points": points,
        "metric": pairs["metric"],
    }


def class_heatmap(
    records: Sequence[GateRecord], selected: str | None = None, *, max_width: int = 560
) -> dict[str, Any] | None:
    """Cells of the per-class angle heat map over the model's most recent gate runs with angles (``None`` without).

    Each cell's opacity is its angle against the largest angle shown; a cell whose angle is above its run's null
    quantile (calibrated runs) is outlined.
    """
    runs = [r for r in records if r.angles][-MAX_HEAT_RUNS:]
    if not runs:
        return None
    classes = [c["class"] for c in per_class({k: 0.0 for r in runs for k in r.angles})][:MAX_HEAT_CLASSES]
    top_angle = max(v for r in runs for v in r.angles.values()) or 1.0
    left, top, right = 70, 10, 16
    cell_w = min(44.0, (max_width - left - right) / len(runs))
    cell_h = 22.0 if len(classes) <= 20 else (14.0 if len(classes) <= 40 else 9.0)
    width = max(round(left + len(runs) * cell_w + right), 320)
    cells, columns = [], []
    for j, r in enumerate(runs):
        x = left + j * cell_w
        columns.append(
            {
                "run_id": r.run_id,
                "x": round(x, 2),
                "cx": round(x + cell_w / 2, 2),
                "colour": colour(r.decision),
                "selected": r.run_id == selected,
                "title": f"{(r.start_time or '?').replace('+00:00', 'Z')} | {r.decision or '-'}",
            }
        )
        for i, k in enumerate(classes):
            a = r.angles.get(k)
            if a is None:
                continue
            moved = r.null_quantile is not None and a > r.null_quantile
            cells.append(
                {
                    "run_id": r.run_id,
                    "cls": k,
                    "x": round(x + 1, 2),
                    "y": round(top + i * cell_h + 1, 2),
                    "w": round(max(cell_w - 2, 1.0), 2),
                    "h": round(cell_h - 2, 2),
                    "opacity": round(0.06 + 0.94 * min(a / top_angle, 1.0), 3),
                    "moved": moved,
                    "title": f"class {k}, {(r.start_time or '?').replace('+00:00', 'Z')}: angle {a:.4g}"
                    + (f" (> null q {r.null_quantile:.4g})" if moved else ""),
                }
            )
    grid_bottom = top + len(classes) * cell_h
    return {
        "width": width,
        "height": round(grid_bottom + 30, 2),
        "left": left,
        "grid_bottom": round(grid_bottom, 2),
        "cell_w": round(cell_w, 2),
        "rows": [{"cls": k, "y": round(top + (i + 0.5) * cell_h + 4, 2)} for i, k in enumerate(classes)],
        "columns": columns,
        "cells": cells,
        "colour": HEAT_COLOUR,
        "top_angle": top_angle,
        "n_classes_total": len({k for r in runs for k in r.angles}),
    }
