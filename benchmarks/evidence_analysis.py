"""The evidence benchmark's analysis: correlations with bootstrap intervals, leave-one-shift-type-out, thresholds.

Used by ``evidence.py`` (run it, not this module); every function takes the rows of ``evidence_runs``.
"""

from __future__ import annotations

import math

import numpy as np

SIGNALS = (
    "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd", "ks", "separability", "confidence_drop",
    "acc_drop",
)  # fmt: skip
TASK_SIGNALS = (
    "resque_task", "resque_task_kmeanspp", "resque_task_flat", "resque_dist_predicted", "resque_dist_none", "mmd",
    "ks", "confidence_drop",
)  # fmt: skip
COSTS = (
    "steps_to_target", "epochs_to_target", "grad_norm", "grad_norm_mean", "param_change", "wall_s", "energy_kwh",
    "emissions_kg",
)  # fmt: skip


def column(rows: list[dict], key: str) -> np.ndarray:
    """``rows[i][key]`` as a float64 array, NaN where missing."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where either is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def correlations(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Spearman and Pearson of ``x`` vs ``y`` with percentile-bootstrap 95% intervals (rows resampled)."""
    from scipy.stats import rankdata

    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    n = x.shape[0]
    out = {"n": n}
    if n < 3:
        return out | {
            k: math.nan for k in ("spearman", "spearman_lo", "spearman_hi", "pearson", "pearson_lo", "pearson_hi")
        }
    idx = np.vstack([np.arange(n), np.random.default_rng(seed).integers(0, n, (n_boot, n))])
    xb, yb = x[idx], y[idx]
    for name, (a, b) in {
        "spearman": (rankdata(xb, axis=1), rankdata(yb, axis=1)),
        "pearson": (xb, yb),
    }.items():
        r = _rowwise_corr(a, b)
        out[name] = float(r[0])
        boot = r[1:][~np.isnan(r[1:])]
        lo, hi = np.percentile(boot, [2.5, 97.5]) if boot.size else (math.nan, math.nan)
        out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of ``x`` and ``y`` over the rows where both are known; NaN if either is constant."""
    from scipy.stats import spearmanr

    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def dist_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Per shift type (each with the no-shift runs as severity 0), and all runs pooled."""
    none = [r for r in rows if r["shift_type"] == "none"]
    types = sorted({r["shift_type"] for r in rows} - {"none"})
    groups = {t: none + [r for r in rows if r["shift_type"] == t] for t in types}
    groups["pooled"] = rows
    return groups


def correlation_table(groups: dict[str, list[dict]], signals, costs, n_boot: int, oracle: bool = False) -> list[dict]:
    """Correlations of every signal with every cost in every group.

    With ``oracle``, the nominal ``severity`` is added as a pseudo-signal within each shift type (not pooled: its
    units differ between types). It is no gate signal: it shows how well any severity-monotone score could rank the
    costs, given their seed-to-seed spread.
    """
    out = []
    for g, rs in groups.items():
        for s in (*signals, "severity") if oracle and g != "pooled" else signals:
            for c in costs:
                out.append({"group": g, "signal": s, "cost": c, **correlations(column(rs, s), column(rs, c), n_boot)})
    return out


def loto(rows: list[dict], cost: str, n_boot: int) -> tuple[list[dict], dict]:
    """Leave-one-shift-type-out: fit the cost model without a type (no-shift runs are a group too), predict it.

    Returns per-row out-of-type predictions and a summary: pooled Spearman (with bootstrap interval) of the
    predictions and of every raw signal against ``cost``, per-type Spearman of both, interval coverage.
    """
    from resque_airflow.core.costmodel import CostModel

    y = column(rows, cost)
    pred = np.full(len(rows), np.nan)
    low, high = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    types = sorted({r["shift_type"] for r in rows})
    weights = {}
    for t in types:
        test = [i for i, r in enumerate(rows) if r["shift_type"] == t]
        train = [i for i, r in enumerate(rows) if r["shift_type"] != t]
        m = CostModel(SIGNALS).fit([rows[i] for i in train], y[train])
        weights[t] = m.explain()["standardised_weights"]
        for i in test:
            p = m.predict(rows[i])
            pred[i], low[i], high[i] = m.predict_transformed([rows[i]])[0], p.low, p.high
    per_row = [
        {"shift_type": r["shift_type"], "severity": r["severity"], "seed": r["seed"], cost: y[i],
         "predicted_log1p": pred[i], "predicted": float(np.expm1(pred[i])), "low": low[i], "high": high[i]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    summary = {"cost": cost, "n": len(rows), "fold_weights": weights, "pooled": {}, "per_type": {}}
    summary["pooled"]["cost_model"] = correlations(pred, y, n_boot)
    summary["coverage"] = float(np.mean((y >= low) & (y <= high)))
    for s in SIGNALS:
        summary["pooled"][s] = correlations(column(rows, s), y, n_boot)
    none = [i for i, r in enumerate(rows) if r["shift_type"] == "none"]
    for t in types:
        if t == "none":
            continue
        idx = none + [i for i, r in enumerate(rows) if r["shift_type"] == t]
        sub = [rows[i] for i in idx]
        summary["per_type"][t] = {"cost_model": spearman(pred[idx], y[idx])} | {
            s: spearman(column(sub, s), y[idx]) for s in SIGNALS
        }
    return per_row, summary


def learning_curve(rows: list[dict], cost: str, sizes, repeats: int, seed: int = 0) -> list[dict]:
    """Cost model fitted on random subsets of ``n`` runs (shift types mixed), Spearman on the remaining runs."""
    from resque_airflow.core.costmodel import CostModel

    rng = np.random.default_rng(seed)
    y = column(rows, cost)
    out = []
    for n in sizes:
        if n >= len(rows) - 3:
            continue
        model_r, best_r = [], []
        for _ in range(repeats):
            perm = rng.permutation(len(rows))
            tr, te = perm[:n], perm[n:]
            if np.ptp(y[tr]) == 0:
                continue  # nothing to learn from a constant history
            m = CostModel(SIGNALS).fit([rows[i] for i in tr], y[tr])
            model_r.append(spearman(m.predict_transformed([rows[i] for i in te]), y[te]))
            # The single signal that ranked the training runs best, scored on the same test runs.
            best = max(SIGNALS, key=lambda s: np.nan_to_num(spearman(column([rows[i] for i in tr], s), y[tr]), nan=-2))
            best_r.append(spearman(column([rows[i] for i in te], best), y[te]))
        if model_r:
            out.append({
                "n_train": n, "repeats": len(model_r),
                "cost_model_mean": float(np.nanmean(model_r)), "cost_model_p10": float(np.nanpercentile(model_r, 10)),
                "cost_model_p90": float(np.nanpercentile(model_r, 90)),
                "best_single_mean": float(np.nanmean(best_r)), "best_single_p10": float(np.nanpercentile(best_r, 10)),
                "best_single_p90": float(np.nanpercentile(best_r, 90)),
            })  # fmt: skip
    return out


def stump(score: np.ndarray, label: np.ndarray, prefer: str) -> dict:
    """The threshold ``t`` for "label is true iff score > t" with the fewest misclassified runs.

    Candidates are the observed scores (and "below all of them"); among equally good candidates ``prefer="low"``
    takes the lowest and ``"high"`` the highest. The returned threshold sits halfway between the chosen candidate
    and the next higher observed score, so that it is not a measured point.
    """
    u = np.unique(score)
    cands = np.concatenate([[-np.inf], u])
    errors = np.array([int(np.sum((score > t) != label)) for t in cands])
    best = cands[errors == errors.min()]
    t = best.min() if prefer == "low" else best.max()
    above = u[u > t]
    below = u[u <= t]
    if not above.size:
        value = 1.0
    elif not below.size:
        value = float(above.min() / 2)
    else:
        value = float((t + above.min()) / 2)
    return {
        "threshold": value,
        "misclassified": int(errors.min()),
        "false_below": int(np.sum(label & (score <= value))),  # label true, but the score says no
        "false_above": int(np.sum(~label & (score > value))),
    }


def thresholds(rows: list[dict]) -> dict:
    """Gate thresholds on RESQUE_dist derived from the measurements (reasoning in ``docs/THRESHOLDS.md``).

    reuse: decision stump for "the run needed any training" (the production model did not already meet the target
    on the shifted held-out data); ties go to the lower, safer threshold.
    rebuild: decision stump for "fine-tuning cost at least as many steps as training from scratch on clean data" (the
    rebuild cost a registry records when a model is published: the mean over the no-shift runs' fresh models); ties
    go to the higher threshold, preferring fine-tuning. Also reported: the per-run comparison with a fresh model
    trained on the same shifted data, and the threshold minimising the total steps of "fine-tune if score <= t,
    else rebuild" with those per-run rebuild costs.
    """
    score = column(rows, "resque_dist")
    ft = column(rows, "steps_to_target")
    rb = column(rows, "rebuild_steps_to_target")
    shift = np.array([r["shift_type"] for r in rows])
    clean_rebuild = float(np.mean(rb[shift == "none"]))
    needed = ft > 0
    costly = ft >= clean_rebuild
    reuse = stump(score, needed, "low")
    rebuild = stump(score, costly, "high")
    out: dict = {
        "n_runs": len(rows),
        "reuse_threshold": reuse["threshold"],
        "rebuild_threshold": rebuild["threshold"],
        "reuse": reuse
        | {
            "n_needed_training": int(needed.sum()),
            "max_steps_of_runs_reused_wrongly": float(ft[needed & (score <= reuse["threshold"])].max(initial=0)),
            "needed_training_by_type": {t: int(needed[shift == t].sum()) for t in sorted(set(shift))},
        },
        "rebuild": rebuild
        | {
            "clean_rebuild_steps": clean_rebuild,
            "n_finetune_ge_clean_rebuild": int(costly.sum()),
            "finetune_ge_clean_rebuild_by_type": {t: int(costly[shift == t].sum()) for t in sorted(set(shift))},
        },
    }
    # Secondary: rebuild cost measured per run, on the same shifted data.
    cheaper = rb < ft
    cands = np.unique(np.concatenate([score, [1.0]]))
    totals = np.array([np.where(score <= t, ft, rb).sum() for t in cands])
    out["per_run_rebuild"] = {
        "n_runs_rebuild_cheaper": int(cheaper.sum()),
        "rebuild_cheaper_by_type": {t: int(cheaper[shift == t].sum()) for t in sorted(set(shift))},
        "lowest_score_rebuild_cheaper": float(score[cheaper].min()) if cheaper.any() else None,
        "total_steps_min_policy": float(totals.min()),
        "min_policy_threshold": float(cands[totals == totals.min()].max()),
        "total_steps_always_finetune": float(ft.sum()),
        "total_steps_always_rebuild": float(rb.sum()),
    }
    ok = out["reuse_threshold"] < out["rebuild_threshold"]
    out["consistent"] = bool(ok)
    return out
