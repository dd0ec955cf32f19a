"""Geometry of the audit view's SVG charts, in SVG user units; the templates only place what is computed here.

- :func:`score_chart`: the RESQUE score of each gate run over time, with the reuse / rebuild thresholds as steps;
- :func:`class_chart`: the per-class angles of one gate run as bars, against its thresholds and score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from resque_airflow.registry.audit import GateRecord

#: Decision -> colour of its points, badges and bars.
DECISION_COLOURS = {"reuse": "#2e7d32", "retrain": "#ef8f00", "rebuild": "#c62828"}
OTHER_COLOUR = "#8a8f98"


def colour(decision: str | None) -> str:
    """Colour of a decision (grey for none or unknown)."""
    return DECISION_COLOURS.get(decision or "", OTHER_COLOUR)


def _nice_ticks(top: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values from 0 to at least ``top``.

    >>> _nice_ticks(0.22)
    [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    """
    if top <= 0:
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def _parse_time(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def _utc(ts: float, fmt: str) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime(fmt)


def _threshold_lines(
    records: Sequence[GateRecord], xs: Sequence[float], y_of: Callable[[float], float], x_start: float, x_end: float
) -> list[dict[str, Any]]:
    """The rebuild and reuse thresholds as step lines: each run's threshold holds until the next run's."""
    lines = []
    for kind, col in (("rebuild", DECISION_COLOURS["rebuild"]), ("reuse", DECISION_COLOURS["reuse"])):
        vals = [(xs[i], r.thresholds.get(kind)) for i, r in enumerate(records) if r.thresholds.get(kind) is not None]
        if not vals:
            continue
        path = [(x_start, vals[0][1])]
        for x, v in vals:
            if v != path[-1][1]:
                path += [(x, path[-1][1]), (x, v)]
        path.append((x_end, vals[-1][1]))
        lines.append(
            {
                "kind": kind,
                "colour": col,
                "points": " ".join(f"{round(x, 2)},{round(y_of(v), 2)}" for x, v in path),
                "label": f"{kind} {vals[-1][1]:g}",
                "label_y": round(y_of(vals[-1][1]) + 4, 2),
            }
        )
    return lines


def _time_ticks(known: Sequence[float], left: float, pw: float) -> list[dict[str, Any]]:
    """Up to six labelled times along the x axis (dates over a span of days, else day and time)."""
    if not known:
        return []
    t0, t1 = min(known), max(known)
    if t1 <= t0:
        return [{"x": round(left + pw / 2, 2), "label": _utc(t0, "%Y-%m-%d %H:%M")}]
    span = t1 - t0
    fmt = "%Y-%m-%d" if span > 2 * 86400 else "%m-%d %H:%M"
    n = min(6, len(known))
    ticks = []
    for k in range(n):
        t = t0 + span * k / max(n - 1, 1)
        ticks.append({"x": round(left + pw * (t - t0) / span, 2), "label": _utc(t, fmt)})
    return ticks


def score_chart(
    records: Sequence[GateRecord], selected: str | None = None, *, width: int = 1120, height: int = 330
) -> dict[str, Any]:
    """Geometry of the score-over-time chart: one marker per gate run, threshold step lines, axes.

    Runs without a score (failed, still scoring) get a hollow marker on the time axis.
    """
    left, right, top, bottom = 56, 120, 18, 46
    pw, ph = width - left - right, height - top - bottom
    times = [_parse_time(r.start_time) for r in records]
    known = [t for t in times if t is not None]
    t0, t1 = (min(known), max(known)) if known else (0.0, 0.0)
    scores = [r.score for r in records if r.score is not None]
    ths = [v for r in records for v in (r.thresholds.get("reuse"), r.thresholds.get("rebuild")) if v is not None]
    ticks = _nice_ticks(max([*scores, *ths, 0.05]) * 1.08)
    y_top = ticks[-1]

    def x_of(i: int) -> float:
        t = times[i]
        if t is None or t1 <= t0:
            return left + pw * ((i + 0.5) / max(len(records), 1) if t1 <= t0 else 0.0)
        return left + pw * (t - t0) / (t1 - t0)

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    points = []
    for i, r in enumerate(records):
        x = x_of(i)
        label = f"{(r.start_time or '?').replace('+00:00', 'Z')} | v{r.model_version or '?'} | "
        label += f"score {r.score:.4g}" if r.score is not None else f"no score ({r.status or r.run_status or '?'})"
        label += f" | {r.decision}" if r.decision else ""
        points.append(
            {
                "run_id": r.run_id,
                "x": round(x, 2),
                "y": round(y_of(r.score), 2) if r.score is not None else round(top + ph, 2),
                "scored": r.score is not None,
                "decision": r.decision or "none",
                "colour": colour(r.decision),
                "selected": r.run_id == selected,
                "title": label,
            }
        )
    trend = " ".join(f"{p['x']},{p['y']}" for p in points if p["scored"])

    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_w": pw,
        "plot_h": ph,
        "right_x": left + pw,
        "bottom_y": top + ph,
        "y_ticks": [{"y": round(y_of(v), 2), "label": f"{v:g}"} for v in ticks],
        "x_ticks": _time_ticks(known, left, pw),
        "points": points,
        "trend": trend,
        "lines": _threshold_lines(records, [x_of(i) for i in range(len(records))], y_of, left, left + pw),
    }


def class_chart(record: GateRecord, *, width: int = 1120, height: int = 270) -> dict[str, Any] | None:
    """Geometry of the per-class angle bars of one gate run (``None`` without per-class angles).

    Bars are coloured by where the class's own angle falls against the run's thresholds; a dashed line marks the
    score (the mean angle).
    """
    items = [c for c in (record.per_class or []) if c.get("angle") is not None]
    if not items:
        return None
    left, right, top, bottom = 56, 120, 14, 44
    pw, ph = width - left - right, height - top - bottom
    reuse, rebuild = record.thresholds.get("reuse"), record.thresholds.get("rebuild")
    ticks = _nice_ticks(max([c["angle"] for c in items] + [v for v in (record.score, rebuild) if v is not None]) * 1.08)
    y_top = ticks[-1]

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    slot = pw / len(items)
    gap = min(slot * 0.2, 6.0)
    show_labels = len(items) <= 40
    bars = []
    for i, c in enumerate(items):
        a = c["angle"]
        if rebuild is not None and a > rebuild:
            col = DECISION_COLOURS["rebuild"]
        elif reuse is not None and a <= reuse:
            col = DECISION_COLOURS["reuse"]
        elif reuse is not None or rebuild is not None:
            col = DECISION_COLOURS["retrain"]
        else:
            col = "#3f6fb5"
        y = y_of(a)
        bars.append(
            {
                "cls": c["class"],
                "angle": a,
                "x": round(left + i * slot + gap / 2, 2),
                "y": round(y, 2),
                "w": round(max(slot - gap, 0.5), 2),
                "h": round(top + ph - y, 2),
                "cx": round(left + (i + 0.5) * slot, 2),
                "colour": col,
                "label": c["class"] if show_labels else "",
                "title": f"class {c['class']}: angle {a:.4g}",
            }
        )
    marks = []
    for kind, value, col in (
        ("score", record.score, "#333a45"),
        ("rebuild", rebuild, DECISION_COLOURS["rebuild"]),
        ("reuse", reuse, DECISION_COLOURS["reuse"]),
    ):
        if value is not None:
            marks.append({"kind": kind, "y": round(y_of(value), 2), "colour": col, "label": f"{kind} {value:.4g}"})
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "right_x": left + pw,
        "bottom_y": top + ph,
        "y_ticks": [{"y": round(y_of(v), 2), "label": f"{v:g}"} for v in ticks],
        "bars": bars,
        "marks": marks,
    }
