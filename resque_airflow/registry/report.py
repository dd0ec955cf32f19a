"""One self-contained HTML report per gate run (no scripts, no external files), logged as ``resque/report.html``.

It shows the score with its interval against the model's null at this batch size, the decision and its sentence,
the accuracy (measured or estimated), the cost forecast, the companion signals and the per-class angles.
"""

from __future__ import annotations

import html
import math

REPORT_ARTIFACT = "resque/report.html"

_CSS = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f4f4f4}"
    ".decision{font-size:20px;font-weight:600}.bar{fill:#7a5fb0}.null{fill:#cfc}.int{stroke:#c33;stroke-width:3}"
)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _score_chart(score: float, interval: list | None, null_quantile: float | None) -> str:
    """A horizontal axis 0..max with the null's accepted region, the interval and the score."""
    hi = max([score, *(interval or []), null_quantile or 0.0, 1e-6]) * 1.25
    x = lambda v: 20 + 460 * float(v) / hi  # noqa: E731
    parts = ['<svg width="500" height="60" role="img" aria-label="score against its null">']
    if null_quantile is not None:
        parts.append(f'<rect class="null" x="20" y="15" width="{x(null_quantile) - 20:.1f}" height="20"/>')
    if interval:
        parts.append(f'<line class="int" x1="{x(interval[0]):.1f}" x2="{x(interval[1]):.1f}" y1="25" y2="25"/>')
    parts.append(f'<circle cx="{x(score):.1f}" cy="25" r="5"/>')
    parts.append(f'<text x="20" y="55">0</text><text x="440" y="55">{hi:.3g}</text></svg>')
    return "".join(parts)


def _angle_bars(per_class: dict) -> str:
    if not per_class:
        return "<p>no per-class angles (task mode or a single class)</p>"
    items = sorted(per_class.items(), key=lambda kv: str(kv[0]))
    top = max([float(v) for _, v in items] + [1e-9])
    rows = []
    for i, (k, v) in enumerate(items):
        w = 380 * float(v) / top
        rows.append(
            f'<text x="0" y="{14 + 18 * i}">class {html.escape(str(k))}</text>'
            f'<rect class="bar" x="70" y="{3 + 18 * i}" width="{w:.1f}" height="13"/>'
            f'<text x="{75 + w:.1f}" y="{14 + 18 * i}">{float(v):.4f}</text>'
        )
    height = 18 * len(items) + 6
    return f'<svg width="520" height="{height}" role="img" aria-label="per-class angles">{"".join(rows)}</svg>'


def render_report(outcome: dict) -> str:
    """The HTML report of a gate outcome (``GateOutcome.to_dict()``, per-class angles included)."""
    cal = outcome.get("calibration") or {}
    det = cal.get("detection") or {}
    acc_m, acc_e = cal.get("accuracy_measured") or {}, cal.get("accuracy_estimated") or {}
    pred = outcome.get("prediction") or {}
    title = f"{outcome.get('model_name')} v{outcome.get('model_version')}: {outcome.get('decision')}"
    interval = outcome.get("interval")
    interval = None if not interval or None in interval else interval  # an end that is not a number is unknown
    sections = [
        f"<h1>RESQUE gate: {html.escape(title)}</h1>",
        f'<p class="decision">{html.escape(str(outcome.get("decision")))}</p>',
        f"<p>{html.escape(outcome.get('reason') or '')}</p>",
        "<h2>Score against its null</h2>",
        _score_chart(float(outcome.get("score") or 0.0), interval, det.get("null_quantile")),
        _table(
            [
                ("score", outcome.get("score")),
                ("interval", _pair({"low": interval[0], "high": interval[1]}) if interval else None),
                ("null quantile", det.get("null_quantile")),
                ("p-value", det.get("p_value")),
                ("shift detected", det.get("detected")),
                ("alpha", det.get("alpha")),
            ]
        ),
        "<h2>Accuracy</h2>",
        _table(
            [
                ("measured", acc_m.get("value")),
                ("measured interval", _pair(acc_m)),
                ("estimated (ATC)", acc_e.get("value")),
                ("estimated interval", _pair(acc_e)),
            ]
        ),
        "<h2>Cost forecast</h2>",
        _table(
            [
                (k, pred.get(k))
                for k in ("cost_metric", "predicted", "low", "high", "rebuild_cost", "basis", "n_history")
            ]
        )
        if pred
        else "<p>no forecast</p>",
        "<h2>Companion signals</h2>",
        _table(sorted((outcome.get("signals") or {}).items())),
        "<h2>Per-class angles</h2>",
        _angle_bars(outcome.get("per_class") or {}),
        "<h2>Run</h2>",
        _table(
            [
                (k, outcome.get(k))
                for k in (
                    "gate_run_id",
                    "policy",
                    "data_uri",
                    "data_hash",
                    "n_samples",
                    "n_classes",
                    "label_source",
                    "provider",
                    "layer",
                )
            ]
        ),
    ]
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>"
    )


def _pair(acc: dict) -> str | None:
    if acc.get("low") is None:
        return None
    return f"{acc['low']:.4g} .. {acc['high']:.4g}"
