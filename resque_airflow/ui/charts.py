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
NULL_COLOUR = "#5b6b8c"  # the null quantile at the batch size
MOVED_COLOUR = "#ef8f00"  # a class above the line (null quantile or reuse threshold)
STILL_COLOUR = "#7fa88a"


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


def _uses_thresholds(record: GateRecord) -> bool:
    """Whether the run decided with its reuse / rebuild thresholds (a calibrated run logs them but decides on its
    null, interval and costs)."""
    return not (record.policy or "").startswith("calibrated")


def spread_labels(labels: list[dict[str, Any]], lo: float, hi: float, gap: float = 14.0) -> list[dict[str, Any]]:
    """Move the labels' ``y`` (text baselines) apart by at least ``gap``, keeping them within ``[lo, hi]``.

    >>> [d["y"] for d in spread_labels([{"y": 100.0}, {"y": 104.0}, {"y": 300.0}], 10, 320)]
    [100.0, 114.0, 300.0]
    """
    order = sorted(labels, key=lambda d: d["y"])
    for i, d in enumerate(order):
        d["y"] = max(d["y"], lo, order[i - 1]["y"] + gap if i else lo)
    overflow = (order[-1]["y"] - hi) if order else 0.0
    if overflow > 0:  # pushed past the bottom: shift the packed run up
        for i in range(len(order) - 1, -1, -1):
            limit = hi if i == len(order) - 1 else order[i + 1]["y"] - gap
            if order[i]["y"] <= limit:
                break
            order[i]["y"] = limit
    for d in order:
        d["y"] = round(d["y"], 2)
    return labels


def _threshold_lines(
    records: Sequence[GateRecord],
    xs: Sequence[float],
    y_of: Callable[[float], float],
    x_start: float,
    x_end: float,
    y_top: float,
) -> list[dict[str, Any]]:
    """The rebuild and reuse thresholds as step lines: each run's threshold holds until the next run's.

    Only runs that decided with thresholds count; a threshold above the chart's range is not drawn, its label says
    "off scale" at the top.
    """
    lines = []
    for kind, col in (("rebuild", DECISION_COLOURS["rebuild"]), ("reuse", DECISION_COLOURS["reuse"])):
        vals = [
            (xs[i], r.thresholds.get(kind))
            for i, r in enumerate(records)
            if r.thresholds.get(kind) is not None and _uses_thresholds(r)
        ]
        if not vals:
            continue
        path = [(x_start, vals[0][1])]
        for x, v in vals:
            if v != path[-1][1]:
                path += [(x, path[-1][1]), (x, v)]
        path.append((x_end, vals[-1][1]))
        off = all(v > y_top for _, v in path)
        lines.append(
            {
                "kind": kind,
                "colour": col,
                "points": "" if off else " ".join(f"{round(x, 2)},{round(y_of(v), 2)}" for x, v in path),
                "label": f"{kind} {vals[-1][1]:g}" + (" (off scale)" if off else ""),
                "y": y_of(min(vals[-1][1], y_top)) + 4,
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


def _y_range(records: Sequence[GateRecord]) -> float:
    """Top of the score axis: the scores, their intervals and nulls, and the thresholds runs decided with; a
    threshold far above the data (the default rebuild threshold 1.0) is left off scale rather than flattening it."""
    data = [v for r in records for v in (r.score, r.null_quantile, *(r.interval or [])) if v is not None]
    ths = [
        v
        for r in records
        if _uses_thresholds(r)
        for v in (r.thresholds.get("reuse"), r.thresholds.get("rebuild"))
        if v is not None
    ]
    base = max([*data, 0.01])
    return max([base, *(v for v in ths if v <= 3 * base)])


def score_chart(
    records: Sequence[GateRecord], selected: str | None = None, *, width: int = 1120, height: int = 330
) -> dict[str, Any]:
    """Geometry of the score-over-time chart: one marker per gate run with its 90% interval and the null's quantile
    at its batch size, threshold step lines, axes, and right-hand labels that never overlap.

    Runs without a score (failed, still scoring) get a hollow marker on the time axis.
    """
    left, right, top, bottom = 56, 170, 18, 46
    pw, ph = width - left - right, height - top - bottom
    times = [_parse_time(r.start_time) for r in records]
    known = [t for t in times if t is not None]
    t0, t1 = (min(known), max(known)) if known else (0.0, 0.0)
    ticks = _nice_ticks(_y_range(records) * 1.08)
    y_top = ticks[-1]

    def x_of(i: int) -> float:
        t = times[i]
        if t is None or t1 <= t0:
            return left + pw * ((i + 0.5) / max(len(records), 1) if t1 <= t0 else 0.0)
        return left + pw * (t - t0) / (t1 - t0)

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    points, nulls = [], []
    for i, r in enumerate(records):
        x = x_of(i)
        label = f"{(r.start_time or '?').replace('+00:00', 'Z')} | v{r.model_version or '?'} | "
        label += f"score {r.score:.4g}" if r.score is not None else f"no score ({r.status or r.run_status or '?'})"
        if r.interval:
            label += f" [{r.interval[0]:.4g}, {r.interval[1]:.4g}]"
        if r.null_quantile is not None:
            label += f" | null q {r.null_quantile:.4g}"
        label += f" | {r.decision}" if r.decision else ""
        point = {
            "run_id": r.run_id,
            "x": round(x, 2),
            "y": round(y_of(r.score), 2) if r.score is not None else round(top + ph, 2),
            "scored": r.score is not None,
            "decision": r.decision or "none",
            "colour": colour(r.decision),
            "selected": r.run_id == selected,
            "title": label,
            "interval": None,
            "null_y": None,
        }
        if r.interval and r.score is not None:
            point["interval"] = {"y1": round(y_of(r.interval[1]), 2), "y2": round(y_of(r.interval[0]), 2)}
        if r.null_quantile is not None:
            point["null_y"] = round(y_of(r.null_quantile), 2)
            nulls.append(f"{round(x, 2)},{point['null_y']}")
        points.append(point)
    trend = " ".join(f"{p['x']},{p['y']}" for p in points if p["scored"])
    lines = _threshold_lines(records, [x_of(i) for i in range(len(records))], y_of, left, left + pw, y_top)
    labels = [{"key": line["kind"], "text": line["label"], "colour": line["colour"], "y": line["y"]} for line in lines]
    last_null = next((r.null_quantile for r in reversed(records) if r.null_quantile is not None), None)
    if last_null is not None:
        labels.append({"key": "null", "text": f"null q {last_null:.3g} (latest)", "colour": NULL_COLOUR,
                       "y": y_of(last_null) + 4})  # fmt: skip
    spread_labels(labels, top + 10, top + ph + 4)
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
        "nulls": " ".join(nulls) if len(nulls) > 1 else "",
        "lines": [line for line in lines if line["points"]],
        "labels": labels,
    }


# C901 14: geometry with one branch per optional line (score, interval, null quantile, thresholds) and label
# placement; splitting it would pass a dozen coordinates between helpers.
def class_chart(record: GateRecord, *, width: int = 1120, height: int = 270) -> dict[str, Any] | None:
    """Geometry of the per-class angle bars of one gate run (``None`` without per-class angles).

    A calibrated run's bars are coloured by whether the class's angle lies above the null quantile of the score at
    this batch size (moved) or not; a threshold run's by where it falls against the thresholds. Lines mark the score
    (the mean angle), its interval, the null quantile and the thresholds the run decided with (off-scale ones are
    left out); their labels never overlap.
    """
    items = [c for c in (record.per_class or []) if c.get("angle") is not None]
    if not items:
        return None
    left, right, top, bottom = 56, 170, 14, 44
    pw, ph = width - left - right, height - top - bottom
    calibrated = record.null_quantile is not None
    reuse, rebuild = record.thresholds.get("reuse"), record.thresholds.get("rebuild")
    if calibrated or not _uses_thresholds(record):
        reuse = rebuild = None
    data = [c["angle"] for c in items] + [v for v in (record.score, record.null_quantile, reuse) if v is not None]
    top_v = max(data)
    if rebuild is not None and rebuild <= 3 * top_v:
        top_v = max(top_v, rebuild)
    else:
        rebuild = None
    ticks = _nice_ticks(top_v * 1.08)
    y_top = ticks[-1]

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    slot = pw / len(items)
    gap = min(slot * 0.2, 6.0)
    show_labels = len(items) <= 40
    bars = []
    for i, c in enumerate(items):
        a = c["angle"]
        if calibrated:
            col = MOVED_COLOUR if a > record.null_quantile else STILL_COLOUR
        elif rebuild is not None and a > rebuild:
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
                "moved": calibrated and a > record.null_quantile,
                "label": c["class"] if show_labels else "",
                "title": f"class {c['class']}: angle {a:.4g}",
            }
        )
    marks = []
    for kind, value, col in (
        ("score", record.score, "#333a45"),
        ("null", record.null_quantile, NULL_COLOUR),
        ("rebuild", rebuild, DECISION_COLOURS["rebuild"]),
        ("reuse", reuse, DECISION_COLOURS["reuse"]),
    ):
        if value is not None:
            name = "null q" if kind == "null" else kind
            marks.append({"kind": kind, "y": round(y_of(value), 2), "colour": col, "label": f"{name} {value:.4g}",
                          "label_y": y_of(value) + 4})  # fmt: skip
    wrapped = spread_labels([{"y": m["label_y"], "mark": m} for m in marks], top + 8, top + ph + 4)
    for w in wrapped:
        w["mark"]["label_y"] = w["y"]
    band = None
    if record.interval:
        y1, y2 = y_of(record.interval[1]), y_of(record.interval[0])
        band = {"y": round(y1, 2), "h": round(max(y2 - y1, 1.0), 2)}
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
        "band": band,
        "calibrated": calibrated,
    }
