"""The Markdown tables of docs/PERFORMANCE.md, from the JSON the benchmarks wrote.

Usage::

    python benchmarks/performance_tables.py docs/performance/standard-1.json docs/performance/standard-2.json \\
        [--fixed-costs docs/performance/fixed_costs.json]

Prints, per model: the ratios of each ``--standard`` run side by side with their relative difference (the +-5%
stability check) and the load average of every repeat; every path's throughput, wall and CPU time and peak memory;
and, from ``fixed_costs.py``, each stage of a cold and a warm gate with the memory after it and the MLflow calls.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIOS = ("gate_vs_ort", "gate_vs_torch", "gate_vs_reference", "rss_vs_ort", "rss_ratio_10x")
TARGETS = {"gate_vs_ort": ">= 0.95", "gate_vs_torch": ">= 1.2", "gate_vs_reference": ">= 2", "rss_vs_ort": "<= 1.15",
           "rss_ratio_10x": "<= 1.1", "statistics_cost": ">= 0.95"}  # fmt: skip


def _ratios(m: dict) -> dict[str, float | None]:
    out = {k: m.get(k) for k in RATIOS}
    out["statistics_cost"] = (m["ratios"].get("statistics_cost") or {}).get("median")
    out["cpu_gate_vs_ort"] = m["ratios"]["cpu_gate_vs_ort"]["median"]
    out["gate_pass_vs_ort"] = m["ratios"]["gate_pass_vs_ort"]["median"]
    out["gate_cold_vs_ort"] = m.get("gate_cold_vs_ort")
    out["rss_vs_ort_cold"] = m.get("rss_vs_ort_cold")
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def stability(runs: list[dict]) -> str:
    lines = []
    for name in runs[0]["models"]:
        per = [_ratios(r["models"][name]) for r in runs]
        loads = ["; ".join(f"{lv[0]:.2f}" for lv in r["models"][name]["load_per_repeat"]) for r in runs]
        lines += [f"**{name}** (1-minute load at each repeat: first run {loads[0]}; second run {loads[1]})", ""]
        lines += ["| ratio | target | first run | second run | second vs first |", "|---|---|---:|---:|---:|"]
        for key in per[0]:
            a, b = per[0][key], per[1][key]
            diff = f"{100 * (b / a - 1):+.1f}%" if a and b else "-"
            lines.append(f"| `{key}` | {TARGETS.get(key, '')} | {_fmt(a)} | {_fmt(b)} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def paths(runs: list[dict]) -> str:
    lines = ["| model | path | run | images/s | wall (s) | CPU (s) | CPU ms/image | peak RSS (MiB) | load before/after "
             "| steal |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for name in runs[0]["models"]:
        for key in runs[0]["models"][name]["paths"]:
            for i, r in enumerate(runs, 1):
                p = r["models"][name]["paths"].get(key)
                if p is None:
                    continue
                load = f"{(p.get('load_before') or [0])[0]:.2f} / {(p.get('load_after') or [0])[0]:.2f}"
                lines.append(
                    f"| {name} | {key} | {i} | {p['images_per_s']:.1f} | {p.get('seconds', float('nan')):.2f} "
                    f"| {p.get('cpu_seconds', float('nan')):.2f} | {p.get('cpu_ms_per_image', float('nan')):.2f} "
                    f"| {p['peak_rss_mb']:.0f} | {load} | {_pct(p.get('steal_fraction'))} |"
                )
    return "\n".join(lines)


def fixed_costs(report: dict) -> str:
    lines = []
    for name, m in report["models"].items():
        cold, warm = m["stages"]["cold"], m["stages"]["warm"]
        lines += [f"**{name}** ({cold['n']} images; peak RSS cold {cold['peak_rss_mb']:.0f} MiB, warm "
                  f"{warm['peak_rss_mb']:.0f} MiB; heavy modules loaded cold {cold['modules_loaded']}, warm "
                  f"{warm['modules_loaded']})", ""]  # fmt: skip
        lines += ["| stage | cold wall (s) | cold CPU (s) | warm wall (s) | warm CPU (s) | RSS after, warm (MiB) "
                  "| load |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for stage, c in cold["stages"].items():
            w = warm["stages"].get(stage)
            lines.append(
                f"| {stage} | {c['wall_s']:.3f} | {c['cpu_s']:.3f} | {_fmt(w and w['wall_s'])} "
                f"| {_fmt(w and w['cpu_s'])} | {_fmt(w and w['rss_mib_after'], 0)} | {(c['load'] or [0])[0]:.2f} |"
            )
        g = m["run_gate"]
        calls = ", ".join(f"`{k}` x{v['calls']}" for k, v in g["by_method"].items())
        lines += ["", f"Real `run_gate` (SQLite registry, warm cache): {g['run_gate_wall_s']:.2f} s wall, "
                  f"{g['run_gate_cpu_s']:.2f} s CPU, peak RSS {g['peak_rss_mb']:.0f} MiB; **{g['client_calls']} "
                  f"MlflowClient calls, {g['client_seconds']:.2f} s**: {calls}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs=2, type=Path, help="two --standard JSON reports")
    p.add_argument("--fixed-costs", type=Path)
    args = p.parse_args(argv)
    runs = [json.loads(r.read_text()) for r in args.runs]
    print("## Stability: two --standard runs\n")
    print(stability(runs))
    print("## Every path\n")
    print(paths(runs))
    if args.fixed_costs:
        print("\n## Fixed costs\n")
        print(fixed_costs(json.loads(args.fixed_costs.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
