"""Analysis of the Fashion-MNIST benchmark's runs: correlations, leave-one-shift-type-out, the paper's claims, plots.

Every function takes the per-run rows (dicts, as written to ``dist_runs.csv`` / ``task_runs.csv``) and returns plain
dicts and lists; :func:`analyse` writes the tables, ``report.md`` and the PNG plots and returns the summary's
``goals``, ``claims`` and ``resque_vs_severity`` entries.

Censored runs (target not reached within the cap) have ``steps_to_target`` = the steps run, the same for every
censored run of a family (the cap is fixed), so ranking them tied at the top is the survival-aware rank order with a
common censoring point. Correlations are reported with them ("all") and without them ("uncensored").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SIGNALS = (
    "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd", "ks", "separability", "confidence_drop",
    "acc_drop",
)  # fmt: skip
TASK_SIGNALS = ("resque_task", "resque_task_kmeanspp", "resque_dist_predicted", "resque_dist_none", "mmd", "ks",
                "confidence_drop")  # fmt: skip
COSTS = (
    "steps_to_target", "epochs_to_target", "grad_norm", "grad_norm_mean", "param_change", "wall_s", "energy_kwh",
    "emissions_kg",
)  # fmt: skip
CLAIMS = {  # the paper's claim -> the cost column it is checked on
    "epochs to target": "epochs_to_target",
    "gradient norm (first epoch)": "grad_norm",
    "parameter change": "param_change",
    "energy": "energy_kwh",
    "CO2": "emissions_kg",
}


def col(rows: list[dict], key: str) -> np.ndarray:
    """Column ``key`` of ``rows`` as float64 (None, empty or missing -> NaN)."""
    out = []
    for r in rows:
        v = r.get(key)
        out.append(np.nan if v is None or v == "" else float(v))
    return np.array(out, dtype=np.float64)


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def correlations(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Spearman and Pearson of ``x`` vs ``y`` with percentile-bootstrap 95% intervals (rows resampled; NaN pairs
    dropped). Keys: ``n``, ``spearman``, ``spearman_lo``, ``spearman_hi``, ``pearson``, ``pearson_lo``,
    ``pearson_hi``."""
    from scipy.stats import rankdata

    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    n = int(x.shape[0])
    keys = ("spearman", "spearman_lo", "spearman_hi", "pearson", "pearson_lo", "pearson_hi")
    if n < 3:
        return {"n": n} | dict.fromkeys(keys, math.nan)
    idx = np.vstack([np.arange(n), np.random.default_rng(seed).integers(0, n, (n_boot, n))])
    xb, yb = x[idx], y[idx]
    out: dict = {"n": n}
    for name, (a, b) in {"spearman": (rankdata(xb, axis=1), rankdata(yb, axis=1)), "pearson": (xb, yb)}.items():
        r = _rowwise_corr(a, b)
        boot = r[1:][~np.isnan(r[1:])]
        lo, hi = np.percentile(boot, [2.5, 97.5]) if boot.size else (math.nan, math.nan)
        out |= {name: float(r[0]), f"{name}_lo": float(lo), f"{name}_hi": float(hi)}
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (NaN with fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def dist_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Per shift type (each with the no-shift runs as severity 0), and all runs ``pooled``."""
    none = [r for r in rows if r["shift_type"] == "none"]
    types = list(dict.fromkeys(r["shift_type"] for r in rows if r["shift_type"] != "none"))
    return {t: none + [r for r in rows if r["shift_type"] == t] for t in types} | {"pooled": rows}


def families(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model_family"] for r in rows))


def dist_correlations(rows: list[dict], n_boot: int) -> list[dict]:
    """Every signal (plus the nominal ``severity`` within a type) vs every cost, per family and group, with all runs
    and with the uncensored runs only."""
    out = []
    for fam in families(rows):
        for g, rs in dist_groups([r for r in rows if r["model_family"] == fam]).items():
            unc = [r for r in rs if not int(r["censored"])]
            for s in (*SIGNALS, "severity") if g != "pooled" else SIGNALS:
                for c in COSTS:
                    for variant, sub in (("all", rs), ("uncensored", unc)):
                        out.append({"model_family": fam, "group": g, "variant": variant, "signal": s, "cost": c}
                                   | correlations(col(sub, s), col(sub, c), n_boot))  # fmt: skip
    return out


def task_means(rows: list[dict]) -> list[dict]:
    """One row per (family, task): the mean over seeds of every task signal and cost (RESQUE_task itself does not
    depend on the seed, so the task, not the run, is the unit of evidence)."""
    import warnings

    out = []
    for key in dict.fromkeys((r["model_family"], r["task"]) for r in rows):
        rs = [r for r in rows if (r["model_family"], r["task"]) == key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a cost not measured (e.g. energy off): NaN
            out.append({"model_family": key[0], "task": key[1]}
                       | {k: float(np.nanmean(col(rs, k))) for k in (*TASK_SIGNALS, *COSTS)})  # fmt: skip
    return out


DETECTED = "gate_calibration_detection_detected"  # the calibrated null's verdict, when the product reports one


def decision_quality(rows: list[dict]) -> list[dict]:
    """Per family: the calibrated null's "shift detected" against "the run needed training" (the source model
    missed the target on the shifted test data, steps > 0). Empty when the product reports no null check."""
    out = []
    for fam in families(rows):
        rs = [r for r in rows if r["model_family"] == fam and r.get(DETECTED) not in (None, "")]
        if not rs:
            continue
        det = np.array([str(r[DETECTED]).lower() in ("true", "1") for r in rs])
        need = col(rs, "steps_to_target") > 0
        out.append({"model_family": fam, "n": len(rs), "detected_and_needed": int((det & need).sum()),
                    "detected_not_needed": int((det & ~need).sum()), "missed_needed": int((~det & need).sum()),
                    "quiet_not_needed": int((~det & ~need).sum()),
                    "max_steps_missed": float(col(rs, "steps_to_target")[~det & need].max(initial=0)),
                    "none_runs_detected": int(sum(d for d, r in zip(det, rs, strict=True)
                                                  if r["shift_type"] == "none"))})  # fmt: skip
    return out


def task_correlations(rows: list[dict], n_boot: int) -> list[dict]:
    """Every task signal vs every cost, per family and pooled over families (``all``), over runs (``unit=runs``:
    tasks x seeds; intervals too narrow, the signal repeats across seeds) and over task means (``unit=tasks``)."""
    out = []
    means = task_means(rows)
    for unit, data in (("runs", rows), ("tasks", means)):
        for fam in [*families(rows), "all"]:
            rs = data if fam == "all" else [r for r in data if r["model_family"] == fam]
            for s in TASK_SIGNALS:
                for c in COSTS:
                    out.append({"model_family": fam, "unit": unit, "signal": s, "cost": c}
                               | correlations(col(rs, s), col(rs, c), n_boot))  # fmt: skip
    return out


def loto(rows: list[dict], cost: str, n_boot: int) -> tuple[list[dict], dict]:
    """Leave-one-shift-type-out for one family: ``CostModel`` fitted without a type (the no-shift runs are a group
    too) predicts it; the out-of-type predictions of every fold are ranked together against ``cost``, beside every
    single signal's raw ranking. Returns per-row predictions and a summary."""
    from resque_airflow.core.costmodel import CostModel

    y = col(rows, cost)
    pred, low, high = (np.full(len(rows), np.nan) for _ in range(3))
    types = list(dict.fromkeys(r["shift_type"] for r in rows))
    weights = {}
    for t in types:
        test = [i for i, r in enumerate(rows) if r["shift_type"] == t]
        train = [i for i, r in enumerate(rows) if r["shift_type"] != t]
        m = CostModel(SIGNALS).fit([rows[i] for i in train], y[train])
        weights[t] = m.explain().get("standardised_weights")
        for i in test:
            p = m.predict(rows[i])
            pred[i], low[i], high[i] = m.predict_transformed([rows[i]])[0], p.low, p.high
    per_row = [
        {"model_family": r["model_family"], "shift_type": r["shift_type"], "severity": r["severity"],
         "seed": r["seed"], "censored": r["censored"], cost: y[i], "predicted_log1p": pred[i],
         "predicted": float(np.expm1(pred[i])), "low": low[i], "high": high[i]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    summary: dict = {"cost": cost, "n": len(rows), "fold_weights": weights, "pooled": {}, "per_type": {}}
    summary["pooled"]["cost_model"] = correlations(pred, y, n_boot)
    summary["coverage"] = float(np.mean((y >= low) & (y <= high)))
    for s in SIGNALS:
        summary["pooled"][s] = correlations(col(rows, s), y, n_boot)
    unc = col(rows, "censored") == 0
    summary["pooled_uncensored"] = {"cost_model": spearman(pred[unc], y[unc])} | {
        s: spearman(col(rows, s)[unc], y[unc]) for s in SIGNALS
    }
    return per_row, summary


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(d: dict, name: str = "spearman") -> str:
    return f"{_fmt(d.get(name))} [{_fmt(d.get(name + '_lo'))}, {_fmt(d.get(name + '_hi'))}]"


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def claims(dist_corr: list[dict], task_corr: list[dict], fams: list[str]) -> list[dict]:
    """The paper's claims (RESQUE_dist and RESQUE_task correlate positively with each cost), checked per family.

    Verdict for distribution shift: "holds" when Spearman >= 0.7 within every shift type and the pooled interval is
    above 0; "partly" when the pooled interval is above 0 or the median within-type Spearman is >= 0.7; "does not
    hold" otherwise. For task shift, over the per-task means (few tasks): "holds" when Spearman >= 0.7 and its
    interval is above 0, "partly" when only the interval is above 0 (or rho >= 0.7 with a wide interval), else
    "does not hold".
    """
    look = {(r["model_family"], r["group"], r["variant"], r["signal"], r["cost"]): r for r in dist_corr}
    tlook = {(r["model_family"], r["signal"], r["cost"]): r for r in task_corr if r["unit"] == "tasks"}
    out = []
    for fam in fams:
        groups = sorted({r["group"] for r in dist_corr if r["model_family"] == fam} - {"pooled"})
        for claim, c in CLAIMS.items():
            within = [look[(fam, g, "all", "resque_dist", c)]["spearman"] for g in groups]
            within = [w for w in within if not math.isnan(w)]
            pooled = look[(fam, "pooled", "all", "resque_dist", c)]
            if within and min(within) >= 0.7 and pooled["spearman_lo"] > 0:
                verdict = "holds"
            elif pooled["spearman_lo"] > 0 or (within and float(np.median(within)) >= 0.7):
                verdict = "partly"
            else:
                verdict = "does not hold"
            row = {"model_family": fam, "mode": "dist", "claim": claim, "cost": c, "verdict": verdict,
                   "pooled": pooled, "within_min": min(within, default=math.nan),
                   "within_median": float(np.median(within)) if within else math.nan,
                   "within_max": max(within, default=math.nan)}  # fmt: skip
            out.append(row)
            t = tlook.get((fam, "resque_task", c))
            if t is not None:
                tv = ("holds" if t["spearman"] >= 0.7 and t["spearman_lo"] > 0
                      else "partly" if t["spearman_lo"] > 0 or t["spearman"] >= 0.7 else "does not hold")  # fmt: skip
                out.append({"model_family": fam, "mode": "task", "claim": claim, "cost": c, "verdict": tv,
                            "pooled": t})  # fmt: skip
    return out


def plots(out: Path, dist: list[dict], tasks: list[dict], loto_rows: list[dict]) -> None:
    """Per family: RESQUE_dist vs steps, every signal vs steps, RESQUE_task vs epochs, LOTO predicted vs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def scatter(ax, rows, xkey, ykey, by, cmap):
        for t in dict.fromkeys(r[by] for r in rows):
            rs = [r for r in rows if r[by] == t]
            cens = col(rs, "censored") > 0
            x, y = col(rs, xkey), col(rs, ykey)
            ax.scatter(x[~cens], y[~cens], s=16, color=cmap[t], label=t, alpha=0.8)
            if cens.any():
                ax.scatter(x[cens], y[cens], s=28, color=cmap[t], marker="^", alpha=0.8)
        ax.set_xlabel(xkey)
        ax.set_ylabel(ykey)

    for fam in families(dist):
        rows = [r for r in dist if r["model_family"] == fam]
        types = list(dict.fromkeys(r["shift_type"] for r in rows))
        colors = dict(zip(types, plt.cm.tab10.colors, strict=False))
        fig, ax = plt.subplots(figsize=(7, 5))
        scatter(ax, rows, "resque_dist", "steps_to_target", "shift_type", colors)
        ax.set_title(f"{fam}: RESQUE_dist vs fine-tuning steps (triangles: censored at the cap)", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{fam}_resque_dist_vs_steps.png", dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
        for ax, s in zip(axes.ravel(), SIGNALS, strict=True):
            scatter(ax, rows, s, "steps_to_target", "shift_type", colors)
        axes[0, 0].legend(fontsize=6)
        fig.suptitle(f"{fam}: every signal vs fine-tuning steps to target")
        fig.tight_layout()
        fig.savefig(out / f"{fam}_signals_vs_steps.png", dpi=90)
        plt.close(fig)

        lr = [r for r in loto_rows if r["model_family"] == fam]
        if lr:
            fig, ax = plt.subplots(figsize=(6, 5))
            for t in types:
                rs = [r for r in lr if r["shift_type"] == t]
                ax.scatter(col(rs, "predicted"), col(rs, "steps_to_target"), s=16, color=colors[t], label=t)
            lim = max(1.0, float(np.nanmax(col(lr, "steps_to_target"))), float(np.nanmax(col(lr, "predicted"))))
            ax.plot([0, lim], [0, lim], "k:", lw=1)
            ax.set_xlabel("cost model prediction, left-out shift type (steps)")
            ax.set_ylabel("measured steps to target")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"{fam}_loto_predicted_vs_measured.png", dpi=110)
            plt.close(fig)

        trs = [r for r in tasks if r["model_family"] == fam]
        if trs:
            names = list(dict.fromkeys(r["task"] for r in trs))
            tcolors = dict(zip(names, plt.cm.tab10.colors, strict=False))
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
            scatter(axes[0], trs, "resque_task", "epochs_to_target", "task", tcolors)
            scatter(axes[1], trs, "resque_task", "steps_to_target", "task", tcolors)
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{fam}: RESQUE_task vs fine-tuning cost (new head)")
            fig.tight_layout()
            fig.savefig(out / f"{fam}_resque_task_vs_cost.png", dpi=100)
            plt.close(fig)


def report_md(dist: list[dict], tasks: list[dict], dist_corr, task_corr, loto_summaries, claim_rows,
              n_boot: int) -> str:  # fmt: skip
    """All tables as markdown (``report.md``); docs/EVIDENCE.md quotes from it."""
    look = {(r["model_family"], r["group"], r["variant"], r["signal"], r["cost"]): r for r in dist_corr}
    tl = {(r["model_family"], r["unit"], r["signal"], r["cost"]): r for r in task_corr}
    parts = ["# Fashion-MNIST benchmark: tables", "",
             f"Spearman (Pearson where said) with percentile-bootstrap 95% intervals ({n_boot} resamples of runs). Per "
             "shift type, the no-shift runs are included as severity 0. 'all': censored runs included (tied at the "
             "cap); 'uncensored': without them.", ""]  # fmt: skip
    for fam in families(dist):
        groups = [g for g in dict.fromkeys(r["group"] for r in dist_corr if r["model_family"] == fam)]
        rows = [r for r in dist if r["model_family"] == fam]
        cens = {g: sum(int(r["censored"]) for r in rows if r["shift_type"] == g) for g in groups}
        parts += [f"## {fam}", "", "### Every signal vs steps to target, per shift type (all runs)", "",
                  md_table(["signal", *[f"{g} ({cens.get(g, 0)} cens.)" if g != "pooled" else g for g in groups]],
                           [[s] + [_ci(look[(fam, g, "all", s, "steps_to_target")])
                                   if (fam, g, "all", s, "steps_to_target") in look else "" for g in groups]
                            for s in (*SIGNALS, "severity")]),
                  "", "### Every signal vs steps to target, per shift type (uncensored runs only)", "",
                  md_table(["signal", *groups],
                           [[s] + [_ci(look[(fam, g, "uncensored", s, "steps_to_target")])
                                   if (fam, g, "uncensored", s, "steps_to_target") in look else "" for g in groups]
                            for s in (*SIGNALS, "severity")]),
                  "", "### Pooled: every signal vs every cost, Spearman (all runs)", "",
                  md_table(["signal", *COSTS], [[s] + [_ci(look[(fam, "pooled", "all", s, c)]) for c in COSTS]
                                                for s in SIGNALS]),
                  "", "### Pooled: every signal vs every cost, Pearson (all runs)", "",
                  md_table(["signal", *COSTS], [[s] + [_ci(look[(fam, "pooled", "all", s, c)], "pearson")
                                                       for c in COSTS] for s in SIGNALS]),
                  "", "### RESQUE_dist vs every cost, Spearman, per shift type (all runs)", "",
                  md_table(["shift type", *COSTS], [[g] + [_ci(look[(fam, g, "all", "resque_dist", c)])
                                                            for c in COSTS] for g in groups]),
                  ""]  # fmt: skip
        ls = loto_summaries.get(fam)
        if ls:
            pooled = ls["pooled"]
            order = sorted(pooled, key=lambda k: -np.nan_to_num(pooled[k]["spearman"], nan=-2))
            parts += ["### Leave one shift type out: cost model vs single signals (steps to target)", "",
                      md_table(["predictor", "pooled Spearman [95% CI]", "pooled Pearson [95% CI]",
                                "Spearman, uncensored only"],
                               [[k, _ci(pooled[k]), _ci(pooled[k], "pearson"), _fmt(ls["pooled_uncensored"][k])]
                                for k in order]),
                      "", f"Out-of-type interval coverage: {ls['coverage']:.2f}.", ""]  # fmt: skip
        trs = [r for r in tasks if r["model_family"] == fam]
        if trs:
            body = []
            for name in dict.fromkeys(r["task"] for r in trs):
                rs = [r for r in trs if r["task"] == name]
                body.append([name, str(rs[0]["num_classes"]), str(rs[0]["n_train"]),
                             _fmt(float(rs[0]["target_accuracy"]), 3), _fmt(float(rs[0]["resque_task"]), 3),
                             _fmt(float(rs[0]["resque_task_kmeanspp"]), 3),
                             _fmt(float(np.mean(col(rs, "epochs_to_target")))),
                             _fmt(float(np.mean(col(rs, "steps_to_target"))), 0),
                             _fmt(float(np.nanmean(col(rs, "rebuild_epochs_to_target"))))
                             if not np.all(np.isnan(col(rs, "rebuild_epochs_to_target"))) else "n/a",
                             str(int(col(rs, "censored").sum()))])  # fmt: skip
            parts += ["### Task shift: per task (means over seeds)", "",
                      md_table(["task", "K", "n train", "target", "RESQUE_task", "k-means++", "epochs", "steps",
                                "rebuild epochs", "censored"], body),
                      "", "### Task shift: every signal vs every cost, Spearman over task means", "",
                      md_table(["signal", *COSTS], [[s] + [_ci(tl[(fam, "tasks", s, c)]) for c in COSTS]
                                                    for s in TASK_SIGNALS]),
                      "", "### Task shift: every signal vs every cost, Spearman over runs (tasks x seeds)", "",
                      md_table(["signal", *COSTS], [[s] + [_ci(tl[(fam, "runs", s, c)]) for c in COSTS]
                                                    for s in TASK_SIGNALS]), ""]  # fmt: skip
    if tasks:
        parts += ["## Task shift, both families pooled: Spearman over task means", "",
                  md_table(["signal", *COSTS], [[s] + [_ci(tl[("all", "tasks", s, c)]) for c in COSTS]
                                                for s in TASK_SIGNALS]),
                  ""]  # fmt: skip
    dq = decision_quality(dist)
    if dq:
        parts += ["## Decision quality of the calibrated null (shift detected vs training needed)", "",
                  md_table(["family", "runs", "detected, needed training", "detected, not needed",
                            "missed (needed training)", "quiet, not needed", "max steps of a missed run",
                            "no-shift runs detected"],
                           [[d["model_family"], str(d["n"]), str(d["detected_and_needed"]),
                             str(d["detected_not_needed"]), str(d["missed_needed"]), str(d["quiet_not_needed"]),
                             _fmt(d["max_steps_missed"], 0), str(d["none_runs_detected"])] for d in dq]),
                  ""]  # fmt: skip
    parts += ["## The paper's claims", "",
              md_table(["family", "mode", "claim", "verdict", "pooled Spearman [95% CI]",
                        "within-type min / median / max"],
                       [[c["model_family"], c["mode"], c["claim"], c["verdict"], _ci(c["pooled"]),
                         f"{_fmt(c['within_min'])} / {_fmt(c['within_median'])} / {_fmt(c['within_max'])}"
                         if c["mode"] == "dist" else ""] for c in claim_rows]), ""]  # fmt: skip
    return "\n".join(parts)


def analyse(dist: list[dict], tasks: list[dict], out: Path, n_boot: int) -> dict:
    """Write ``correlations_dist.csv``, ``correlations_task.csv``, ``loto.csv``, ``loto_summary.json``,
    ``report.md`` and the plots into ``out``; return the summary's ``goals``, ``claims``, ``resque_vs_severity``."""
    import json

    from evidence_report import write_csv

    dist_corr = dist_correlations(dist, n_boot)
    task_corr = task_correlations(tasks, n_boot) if tasks else []
    write_csv(out / "correlations_dist.csv", dist_corr)
    if task_corr:
        write_csv(out / "correlations_task.csv", task_corr)
    fams = families(dist)
    loto_rows, loto_summaries = [], {}
    for fam in fams:
        rows = [r for r in dist if r["model_family"] == fam]
        if len({r["shift_type"] for r in rows}) >= 3:
            pr, summ = loto(rows, "steps_to_target", n_boot)
            loto_rows += pr
            loto_summaries[fam] = summ
    if loto_rows:
        write_csv(out / "loto.csv", loto_rows)
    (out / "loto_summary.json").write_text(json.dumps(loto_summaries, indent=1, default=float))
    claim_rows = claims(dist_corr, task_corr, fams)
    (out / "report.md").write_text(report_md(dist, tasks, dist_corr, task_corr, loto_summaries, claim_rows, n_boot))
    plots(out, dist, tasks, loto_rows)

    look = {(r["model_family"], r["group"], r["variant"], r["signal"], r["cost"]): r for r in dist_corr}
    goals: dict = {"within_type_spearman_resque_dist_vs_steps": {}, "loto": {}, "task": {}}
    sev: dict = {}
    for fam in fams:
        groups = [g for g in dist_groups([r for r in dist if r["model_family"] == fam]) if g != "pooled"]
        within = {g: look[(fam, g, "all", "resque_dist", "steps_to_target")]["spearman"] for g in groups}
        goals["within_type_spearman_resque_dist_vs_steps"][fam] = within
        fam_groups = dist_groups([r for r in dist if r["model_family"] == fam])
        sev[fam] = {g: spearman(col(rs, "resque_dist"), col(rs, "severity")) for g, rs in fam_groups.items()
                    if g != "pooled"}  # fmt: skip
        if fam in loto_summaries:
            p = loto_summaries[fam]["pooled"]
            best = max(SIGNALS, key=lambda s: np.nan_to_num(p[s]["spearman"], nan=-2))
            cm = p["cost_model"]["spearman"]
            goals["loto"][fam] = {
                "cost_model_spearman": cm, "best_single_signal": best, "best_single_spearman": p[best]["spearman"],
                "met_ge_0.85_and_above_every_signal": bool(
                    cm >= 0.85 and all(cm > p[s]["spearman"] for s in SIGNALS if not math.isnan(p[s]["spearman"]))
                ),
            }  # fmt: skip
    for r in task_corr:
        if r["signal"] == "resque_task" and r["cost"] in ("epochs_to_target", "steps_to_target"):
            goals["task"].setdefault(r["model_family"], {})[f"{r['cost']}_over_{r['unit']}"] = {
                k: r[k] for k in ("n", "spearman", "spearman_lo", "spearman_hi")
            }
    goals["within_type_ge_0.9_everywhere"] = all(
        v >= 0.9 for fam in goals["within_type_spearman_resque_dist_vs_steps"].values() for v in fam.values()
    )
    return {"goals": goals, "claims": claim_rows, "resque_vs_severity": sev, "decision_quality": decision_quality(dist)}
