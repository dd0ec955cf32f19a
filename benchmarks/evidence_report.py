"""The evidence benchmark's outputs: CSV files, Markdown tables and PNG plots.

Used by ``evidence.py`` (run it, not this module).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from evidence_analysis import COSTS, SIGNALS, TASK_SIGNALS, column


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as CSV; the columns are every key, in order of first appearance (None -> empty)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in keys})


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(d: dict, name: str = "spearman") -> str:
    return f"{_fmt(d.get(name))} [{_fmt(d.get(name + '_lo'))}, {_fmt(d.get(name + '_hi'))}]"


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table of ``header`` and the ``body`` rows (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def task_means_md(task_rows: list[dict]) -> str:
    """One line per task: its RESQUE_task scores and mean costs over seeds."""
    body = []
    for name in dict.fromkeys(r["task"] for r in task_rows):
        rs = [r for r in task_rows if r["task"] == name]
        m = {k: float(np.mean(column(rs, k))) for k in (
            "resque_task", "resque_task_flat", "epochs_to_target", "steps_to_target", "rebuild_epochs_to_target",
            "target_accuracy", "censored",
        )}  # fmt: skip
        body.append([
            name, str(rs[0]["num_classes"]), str(rs[0]["n_train"]), _fmt(m["target_accuracy"], 3),
            _fmt(m["resque_task"], 3), _fmt(m["resque_task_flat"], 3), _fmt(m["epochs_to_target"]),
            _fmt(m["steps_to_target"], 0), _fmt(m["rebuild_epochs_to_target"]), str(int(m["censored"] * len(rs))),
        ])  # fmt: skip
    return md_table(
        ["task", "K", "n train", "target", "RESQUE_task", "flat variant", "epochs (mean)", "steps (mean)",
         "rebuild epochs (mean)", "censored"], body,
    )  # fmt: skip


def correlations_md(
    dist_corr: list[dict], task_corr: list[dict], groups: list[str], n_boot: int, task_table: str = ""
) -> str:
    """``correlations.md``: the tables of :func:`evidence_analysis.correlation_table`'s rows, per shift and pooled."""
    look = {(r["group"], r["signal"], r["cost"]): r for r in dist_corr}
    parts = [
        "# Correlations",
        "",
        f"Spearman (rank) and Pearson correlations, with percentile-bootstrap 95% intervals ({n_boot} resamples of "
        "runs). Per shift type, the no-shift runs are included as severity 0. `n/a`: a constant column.",
        "",
        "## Distribution shift: every signal vs steps to target, Spearman, per shift type and pooled",
        "",
        md_table(
            ["signal", *groups],
            [[s] + [_ci(look[(g, s, "steps_to_target")]) for g in groups] for s in SIGNALS]
            + [
                ["*severity (oracle)*"]
                + [_ci(look[(g, "severity", "steps_to_target")]) if g != "pooled" else "" for g in groups]
            ],
        ),
        "",
        "*severity (oracle)*: the nominal severity of the shift, known only to the benchmark. Its correlation is "
        "what any score that grows with severity could reach, given the spread of the measured cost across seeds.",
        "",
        "## Distribution shift, pooled: every signal vs every cost, Spearman",
        "",
        md_table(["signal", *COSTS], [[s] + [_ci(look[("pooled", s, c)]) for c in COSTS] for s in SIGNALS]),
        "",
        "## Distribution shift, pooled: every signal vs every cost, Pearson",
        "",
        md_table(["signal", *COSTS], [[s] + [_ci(look[("pooled", s, c)], "pearson") for c in COSTS] for s in SIGNALS]),
        "",
        "## RESQUE_dist vs every cost, Spearman, per shift type",
        "",
        md_table(["shift type", *COSTS], [[g] + [_ci(look[(g, "resque_dist", c)]) for c in COSTS] for g in groups]),
        "",
    ]
    if task_corr:
        tl = {(r["signal"], r["cost"]): r for r in task_corr}
        parts += [
            "## Task shift: per task (means over seeds)",
            "",
            task_table,
            "",
            "## Task shift (all tasks and seeds pooled): every signal vs every cost, Spearman",
            "",
            md_table(["signal", *COSTS], [[s] + [_ci(tl[(s, c)]) for c in COSTS] for s in TASK_SIGNALS]),
            "",
            "## Task shift: Pearson",
            "",
            md_table(["signal", *COSTS], [[s] + [_ci(tl[(s, c)], "pearson") for c in COSTS] for s in TASK_SIGNALS]),
            "",
        ]
    return "\n".join(parts)


def loto_md(summary: dict, coverage_nominal: float) -> str:
    """``loto.md``: the leave-one-shift-type-out summary of :func:`evidence_analysis.loto`, best predictor first."""
    pooled = summary["pooled"]
    order = sorted(pooled, key=lambda k: -np.nan_to_num(pooled[k]["spearman"], nan=-2))
    types = list(summary["per_type"])
    return "\n".join(
        [
            f"# Leave-one-shift-type-out: cost model vs single signals ({summary['cost']})",
            "",
            "The cost model is fitted on every shift type but one (the no-shift runs are a group of their own) and "
            "predicts the left-out type; the out-of-type predictions of all folds are then ranked together against the "
            "measured cost. Single signals need no fitting: their raw values are ranked.",
            "",
            md_table(
                ["predictor", "pooled Spearman [95% CI]", "pooled Pearson [95% CI]", *[f"within {t}" for t in types]],
                [
                    [k, _ci(pooled[k]), _ci(pooled[k], "pearson"), *[_fmt(summary["per_type"][t][k]) for t in types]]
                    for k in order
                ],
            ),
            "",
            f"Out-of-type interval coverage of the cost model: {summary['coverage']:.2f} (nominal {coverage_nominal}).",
            "",
        ]
    )


def plots(out: Path, dist_rows: list[dict], task_rows: list[dict], loto_rows: list[dict], curve: list[dict]) -> None:
    """Write the PNG plots (signals against costs, leave-one-out predictions, learning curve) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({r["shift_type"] for r in dist_rows})
    colors = dict(zip(types, plt.cm.tab10.colors, strict=False))

    def scatter(ax, rows, xkey, ykey, by, cmap):
        for t in sorted({r[by] for r in rows}):
            rs = [r for r in rows if r[by] == t]
            cens = column(rs, "censored") > 0
            x, y = column(rs, xkey), column(rs, ykey)
            ax.scatter(x[~cens], y[~cens], s=18, color=cmap[t], label=t, alpha=0.8)
            if cens.any():
                ax.scatter(x[cens], y[cens], s=30, color=cmap[t], marker="^", alpha=0.8)
        ax.set_xlabel(xkey)
        ax.set_ylabel(ykey)

    fig, ax = plt.subplots(figsize=(7, 5))
    scatter(ax, dist_rows, "resque_dist", "steps_to_target", "shift_type", colors)
    ax.set_title("RESQUE_dist vs fine-tuning steps to target (triangles: censored at the cap)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "resque_dist_vs_steps.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, s in zip(axes.ravel(), SIGNALS, strict=True):
        scatter(ax, dist_rows, s, "steps_to_target", "shift_type", colors)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Every signal vs fine-tuning steps to target")
    fig.tight_layout()
    fig.savefig(out / "signals_vs_steps.png", dpi=100)
    plt.close(fig)

    if task_rows:
        tasks = sorted({r["task"] for r in task_rows})
        tcolors = dict(zip(tasks, plt.cm.tab10.colors, strict=False))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        scatter(axes[0], task_rows, "resque_task", "epochs_to_target", "task", tcolors)
        scatter(axes[1], task_rows, "resque_task", "steps_to_target", "task", tcolors)
        axes[0].legend(fontsize=7)
        fig.suptitle("RESQUE_task vs fine-tuning cost (new head)")
        fig.tight_layout()
        fig.savefig(out / "resque_task_vs_cost.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for t in types:
        rs = [r for r in loto_rows if r["shift_type"] == t]
        ax.scatter(column(rs, "predicted"), column(rs, "steps_to_target"), s=18, color=colors[t], label=t, alpha=0.8)
    lim = max(1.0, np.nanmax(column(loto_rows, "steps_to_target")), np.nanmax(column(loto_rows, "predicted")))
    ax.plot([0, lim], [0, lim], "k:", lw=1)
    ax.set_xlabel("cost model prediction, left-out shift type (steps)")
    ax.set_ylabel("measured steps to target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loto_predicted_vs_measured.png", dpi=120)
    plt.close(fig)

    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        n = [c["n_train"] for c in curve]
        for key, label in (("cost_model", "cost model"), ("best_single", "best single signal (chosen on train)")):
            ax.plot(n, [c[f"{key}_mean"] for c in curve], marker="o", label=label)
            ax.fill_between(n, [c[f"{key}_p10"] for c in curve], [c[f"{key}_p90"] for c in curve], alpha=0.2)
        ax.set_xlabel("training runs (random, shift types mixed)")
        ax.set_ylabel("Spearman vs steps on the other runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "learning_curve.png", dpi=120)
        plt.close(fig)
