"""Evidence benchmark: do RESQUE and its companion signals track the measured cost of retraining?

Usage::

    python benchmarks/evidence.py [--quick] [--out docs/evidence] [--no-energy]

Setup (digits, see :mod:`resque_airflow.examples.digits`):

1. Train the production model (``DigitsCNN``) on the clean ``train`` split; its accuracy on the clean ``heldout``
   split sets the retraining target: ``TARGET_RELATIVE`` x that accuracy.
2. The reference summary (``FeatureSummary``) comes from the clean ``reference`` split: pooled ``conv2`` features
   via a forward hook, logits and labels.
3. Distribution shift: for each shift type x severity x seed (plus no shift x seed), the gate's signals
   (``companion_signals``) compare the reference with the shifted ``test`` split (unseen images). The retraining cost
   is then measured with ``fine_tune``: the production model is fine-tuned on the shifted ``train`` split until
   accuracy on the shifted ``heldout`` split reaches the target (quarter-epoch checks, capped). The same data are
   also used to train a freshly initialised model (the rebuild cost).
4. Task shift: for each new task x seed, RESQUE_task (and variants) on the task's ``test`` split under the unchanged
   production model; then fine-tuning with a new head, and a fresh model, to ``TARGET_RELATIVE`` x the accuracy a
   fresh model reaches on that task within the cap (its "ceiling", measured once per task).
5. Analysis: Spearman and Pearson correlations with bootstrap 95% intervals of every signal against every cost, per
   shift type and pooled; scatter plots; the cost model's leave-one-shift-type-out rank correlation against each
   single signal's; a learning curve of the cost model; recommended gate thresholds.

Outputs (in ``--out``): ``dist_runs.csv``, ``task_runs.csv``, ``correlations_dist.csv``, ``correlations_task.csv``,
``correlations.md``, ``loto.csv``, ``loto.md``, ``learning_curve.csv``, ``thresholds.json``, ``thresholds.md``,
``summary.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("evidence")

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
TARGET_RELATIVE = 0.95  # retraining target: this fraction of the production model's clean held-out accuracy
SHIFT_SEED_OFFSETS = {"train": 1, "heldout": 2, "test": 3}  # distinct noise per split, derived from the run seed


@dataclass
class Config:
    """Sizes of one benchmark run. ``full()`` is what ``docs/EVIDENCE.md`` reports; ``quick()`` is the CI smoke test."""

    seeds: tuple[int, ...]
    severities: dict[str, tuple[float, ...]]
    tasks: tuple[str, ...]
    train_epochs: int = 40  # initial training of the production model
    cap_epochs: float = 40.0  # cap of every fine-tune / rebuild run (about twice a clean training's time to target)
    lr: float = 0.1  # SGD (momentum 0.9), the same for training, fine-tuning and rebuilding
    batch_size: int = 32
    target_relative: float = TARGET_RELATIVE
    n_boot: int = 2000
    curve_sizes: tuple[int, ...] = (5, 10, 15, 20, 30, 40, 60, 80, 100, 120)
    curve_repeats: int = 30
    measure_energy: bool = True
    split_seed: int = 0
    model_seed: int = 0

    @classmethod
    def full(cls) -> Config:
        from resque_airflow.examples.digits import SEVERITIES, TASK_NAMES

        return cls(seeds=(0, 1, 2, 3, 4), severities=dict(SEVERITIES), tasks=TASK_NAMES)

    @classmethod
    def quick(cls) -> Config:
        from resque_airflow.examples.digits import SEVERITIES

        return cls(
            seeds=(0,),
            severities={k: (v[1], v[4]) for k, v in SEVERITIES.items()},
            tasks=("parity", "photos_china_flower"),
            train_epochs=20,
            cap_epochs=3.0,
            n_boot=100,
            curve_sizes=(5, 8),
            curve_repeats=3,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


def summarise(model, x: np.ndarray, labels: np.ndarray | None, num_classes: int = 10):
    """A ``FeatureSummary`` of ``x`` under ``model``: pooled representation, logits and (optional) labels."""
    from resque_airflow.core import FeatureSummary
    from resque_airflow.examples.digits import embed

    feats, logits = embed(model, x)
    s = FeatureSummary(num_classes, feats.shape[1], seed=0)
    s.update(feats, logits=logits, labels=labels)
    return s


def cost_columns(cost, prefix: str = "") -> dict:
    """The measured-cost columns of a CSV row (``grad_norm`` is the first epoch's mean)."""
    return {
        f"{prefix}steps_to_target": cost.steps_to_target,
        f"{prefix}epochs_to_target": cost.epochs_to_target,
        f"{prefix}censored": int(cost.censored),
        f"{prefix}grad_norm": cost.grad_norm_first,
        f"{prefix}grad_norm_mean": cost.grad_norm_mean,
        f"{prefix}param_change": cost.param_change,
        f"{prefix}wall_s": cost.wall_s,
        f"{prefix}energy_kwh": cost.energy_kwh,
        f"{prefix}emissions_kg": cost.emissions_kg,
        f"{prefix}final_accuracy": cost.final_accuracy,
        f"{prefix}initial_accuracy": cost.initial_accuracy,
    }


def run_dist(cfg: Config, splits, source, reference, target: float) -> list[dict]:
    """One row per (shift type, severity, seed), plus ``none`` per seed: signals, fine-tune and rebuild costs."""
    from resque_airflow.core import companion_signals
    from resque_airflow.examples.digits import apply_shift, make_model
    from resque_airflow.runtime.training import fine_tune

    settings = [("none", 0.0)] + [(s, v) for s, sev in cfg.severities.items() for v in sev]
    rows = []
    for i, (shift, severity) in enumerate(settings):
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            data = {
                name: apply_shift(getattr(splits, name).x, shift, severity, 1000 * seed + off)
                for name, off in SHIFT_SEED_OFFSETS.items()
            }
            signals = companion_signals(reference, summarise(source, data["test"], splits.test.y))
            signal_s = time.perf_counter() - t0
            train = (data["train"], splits.train.y, data["heldout"], splits.heldout.y)
            common = dict(target_accuracy=target, max_epochs=cfg.cap_epochs, lr=cfg.lr, batch_size=cfg.batch_size)
            ft = fine_tune(copy.deepcopy(source), *train, seed=seed, measure_energy=cfg.measure_energy, **common)
            fresh = make_model(seed=100 + seed)
            rb = fine_tune(fresh, *train, seed=seed, measure_energy=cfg.measure_energy, **common)
            row = {"shift_type": shift, "severity": severity, "seed": seed, **signals}
            row.update(cost_columns(ft))
            row.update(cost_columns(rb, "rebuild_"))
            row["signal_s"] = signal_s
            rows.append(row)
            log.info(
                "[%d/%d] %-15s sev=%-5g seed=%d resque_dist=%.4f steps=%d%s rebuild=%d (%.1fs)",
                i + 1, len(settings), shift, severity, seed, signals["resque_dist"], ft.steps_to_target,
                "+" if ft.censored else "", rb.steps_to_target, time.perf_counter() - t0,
            )  # fmt: skip
    return rows


def run_tasks(cfg: Config, splits, source, reference) -> list[dict]:
    """One row per (new task, seed): RESQUE_task variants, label-free signals, fine-tune (new head), rebuild costs."""
    from resque_airflow.core import companion_signals, resque_task
    from resque_airflow.examples.digits import embed, make_model, make_task, replace_head
    from resque_airflow.runtime.training import fine_tune

    rows = []
    for name in cfg.tasks:
        task = make_task(name, splits, seed=cfg.split_seed)
        feats, _ = embed(source, task.test.x)
        flat, _ = embed(source, task.test.x, pool=False)
        # Label-free companions against the digits reference: the new task's labels live in another label space.
        free = companion_signals(reference, summarise(source, task.test.x, None))
        signals = {
            "resque_task": resque_task(feats, task.test.y).value,
            "resque_task_kmeanspp": resque_task(feats, task.test.y, init="k-means++").value,
            "resque_task_flat": resque_task(flat, task.test.y).value,
            **{k: free[k] for k in ("resque_dist_predicted", "resque_dist_none", "mmd", "ks", "confidence_drop")},
        }
        data = (task.train.x, task.train.y, task.heldout.x, task.heldout.y)
        # The task's attainable accuracy: a fresh model trained for the whole cap (no early stop).
        ceiling = fine_tune(
            make_model(task.num_classes, seed=999), *data, target_accuracy=2.0, max_epochs=cfg.cap_epochs,
            lr=cfg.lr, batch_size=cfg.batch_size, seed=999, measure_energy=False,
        ).final_accuracy  # fmt: skip
        target = cfg.target_relative * ceiling
        common = dict(target_accuracy=target, max_epochs=cfg.cap_epochs, lr=cfg.lr, batch_size=cfg.batch_size)
        for seed in cfg.seeds:
            model = replace_head(copy.deepcopy(source), task.num_classes, seed=seed)
            ft = fine_tune(model, *data, seed=seed, measure_energy=cfg.measure_energy, **common)
            rb = fine_tune(
                make_model(task.num_classes, seed=100 + seed), *data, seed=seed, measure_energy=cfg.measure_energy,
                **common,
            )  # fmt: skip
            row = {
                "task": name, "num_classes": task.num_classes, "n_train": len(task.train), "seed": seed,
                **signals, "ceiling_accuracy": ceiling, "target_accuracy": target,
            }  # fmt: skip
            row.update(cost_columns(ft))
            row.update(cost_columns(rb, "rebuild_"))
            rows.append(row)
            log.info(
                "task %-20s seed=%d resque_task=%.3f target=%.3f epochs=%.2f%s rebuild=%.2f",
                name, seed, signals["resque_task"], target, ft.epochs_to_target, "+" if ft.censored else "",
                rb.epochs_to_target,
            )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------------


def _col(rows: list[dict], key: str) -> np.ndarray:
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
                out.append({"group": g, "signal": s, "cost": c, **correlations(_col(rs, s), _col(rs, c), n_boot)})
    return out


def loto(rows: list[dict], cost: str, n_boot: int) -> tuple[list[dict], dict]:
    """Leave-one-shift-type-out: fit the cost model without a type (no-shift runs are a group too), predict it.

    Returns per-row out-of-type predictions and a summary: pooled Spearman (with bootstrap interval) of the
    predictions and of every raw signal against ``cost``, per-type Spearman of both, interval coverage.
    """
    from resque_airflow.core.costmodel import CostModel

    y = _col(rows, cost)
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
        summary["pooled"][s] = correlations(_col(rows, s), y, n_boot)
    none = [i for i, r in enumerate(rows) if r["shift_type"] == "none"]
    for t in types:
        if t == "none":
            continue
        idx = none + [i for i, r in enumerate(rows) if r["shift_type"] == t]
        sub = [rows[i] for i in idx]
        summary["per_type"][t] = {"cost_model": spearman(pred[idx], y[idx])} | {
            s: spearman(_col(sub, s), y[idx]) for s in SIGNALS
        }
    return per_row, summary


def learning_curve(rows: list[dict], cost: str, sizes, repeats: int, seed: int = 0) -> list[dict]:
    """Cost model fitted on random subsets of ``n`` runs (shift types mixed), Spearman on the remaining runs."""
    from resque_airflow.core.costmodel import CostModel

    rng = np.random.default_rng(seed)
    y = _col(rows, cost)
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
            best = max(SIGNALS, key=lambda s: np.nan_to_num(spearman(_col([rows[i] for i in tr], s), y[tr]), nan=-2))
            best_r.append(spearman(_col([rows[i] for i in te], best), y[te]))
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
    score = _col(rows, "resque_dist")
    ft = _col(rows, "steps_to_target")
    rb = _col(rows, "rebuild_steps_to_target")
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


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
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
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def task_means_md(task_rows: list[dict]) -> str:
    """One line per task: its RESQUE_task scores and mean costs over seeds."""
    body = []
    for name in dict.fromkeys(r["task"] for r in task_rows):
        rs = [r for r in task_rows if r["task"] == name]
        m = {k: float(np.mean(_col(rs, k))) for k in (
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({r["shift_type"] for r in dist_rows})
    colors = dict(zip(types, plt.cm.tab10.colors, strict=False))

    def scatter(ax, rows, xkey, ykey, by, cmap):
        for t in sorted({r[by] for r in rows}):
            rs = [r for r in rows if r[by] == t]
            cens = _col(rs, "censored") > 0
            x, y = _col(rs, xkey), _col(rs, ykey)
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
        ax.scatter(_col(rs, "predicted"), _col(rs, "steps_to_target"), s=18, color=colors[t], label=t, alpha=0.8)
    lim = max(1.0, np.nanmax(_col(loto_rows, "steps_to_target")), np.nanmax(_col(loto_rows, "predicted")))
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


# ----------------------------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: few runs, short caps (< 1 minute)")
    parser.add_argument("--out", default="docs/evidence", help="output folder (created)")
    parser.add_argument("--no-energy", action="store_true", help="skip codecarbon (energy and emissions NaN)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    logging.getLogger("resque_airflow.runtime.training").setLevel(logging.WARNING)  # one summary line per run is enough

    import torch

    from resque_airflow.core.costmodel import CostModel
    from resque_airflow.examples.digits import load_digits_splits, make_model, train_model

    # One intra-op thread: the model is tiny, and with two threads on a 2-core machine shared with other work the
    # OpenMP workers spin and a run took up to 10x longer (measured: 26 s vs 3 s for 40 epochs under load).
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    commit = _git_commit()  # at the start: the code that ran, even if the tree moves on meanwhile
    cfg = Config.quick() if args.quick else Config.full()
    cfg.measure_energy = not args.no_energy
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = load_digits_splits(cfg.split_seed)
    source, train_cost = train_model(
        make_model(seed=cfg.model_seed), splits.train.x, splits.train.y, epochs=cfg.train_epochs, lr=cfg.lr,
        seed=cfg.model_seed, heldout_x=splits.heldout.x, heldout_y=splits.heldout.y, batch_size=cfg.batch_size,
        measure_energy=cfg.measure_energy,
    )  # fmt: skip
    clean_acc = train_cost.final_accuracy
    target = cfg.target_relative * clean_acc
    log.info("production model: clean held-out accuracy %.4f -> target %.4f", clean_acc, target)
    reference = summarise(source, splits.reference.x, splits.reference.y)

    t0 = time.perf_counter()
    dist_rows = run_dist(cfg, splits, source, reference, target)
    t_dist = time.perf_counter() - t0
    t0 = time.perf_counter()
    task_rows = run_tasks(cfg, splits, source, reference)
    t_task = time.perf_counter() - t0
    write_csv(out / "dist_runs.csv", dist_rows)
    write_csv(out / "task_runs.csv", task_rows)

    t0 = time.perf_counter()
    groups = dist_groups(dist_rows)
    dist_corr = correlation_table(groups, SIGNALS, COSTS, cfg.n_boot, oracle=True)
    task_corr = correlation_table({"pooled": task_rows}, TASK_SIGNALS, COSTS, cfg.n_boot) if task_rows else []
    write_csv(out / "correlations_dist.csv", dist_corr)
    write_csv(out / "correlations_task.csv", task_corr)
    task_table = task_means_md(task_rows) if task_rows else ""
    (out / "correlations.md").write_text(correlations_md(dist_corr, task_corr, list(groups), cfg.n_boot, task_table))

    loto_rows, loto_summary = loto(dist_rows, "steps_to_target", cfg.n_boot)
    write_csv(out / "loto.csv", loto_rows)
    nominal = CostModel().coverage
    (out / "loto.md").write_text(loto_md(loto_summary, nominal))
    curve = learning_curve(dist_rows, "steps_to_target", cfg.curve_sizes, cfg.curve_repeats)
    write_csv(out / "learning_curve.csv", curve)
    full_model = CostModel(SIGNALS).fit(dist_rows, _col(dist_rows, "steps_to_target"))
    (out / "cost_model_steps.json").write_text(json.dumps(full_model.to_dict(), indent=1))
    thr = thresholds(dist_rows)
    (out / "thresholds.json").write_text(json.dumps(thr, indent=1))
    plots(out, dist_rows, task_rows, loto_rows, curve)
    t_analysis = time.perf_counter() - t0

    look = {(r["group"], r["signal"], r["cost"]): r for r in dist_corr}
    within = {g: look[(g, "resque_dist", "steps_to_target")]["spearman"] for g in groups if g != "pooled"}
    pooled = loto_summary["pooled"]
    best_single = max(SIGNALS, key=lambda s: np.nan_to_num(pooled[s]["spearman"], nan=-2))
    summary = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "git_commit": commit,
        "config": asdict(cfg),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "production_model": {
            "clean_heldout_accuracy": clean_acc,
            "target_accuracy": target,
            "train_cost": train_cost.to_metrics(),
        },
        "n_dist_runs": len(dist_rows),
        "n_task_runs": len(task_rows),
        "censored_dist_runs": int(_col(dist_rows, "censored").sum()),
        "censored_rebuild_runs": int(_col(dist_rows, "rebuild_censored").sum()),
        "censored_task_runs": int(_col(task_rows, "censored").sum()) if task_rows else 0,
        "goals": {
            "spearman_resque_dist_vs_steps_per_type": within,
            "goal_within_type_spearman_ge_0.9": all(v >= 0.9 for v in within.values()),
            "loto_cost_model_spearman": pooled["cost_model"]["spearman"],
            "loto_best_single_signal": best_single,
            "loto_best_single_spearman": pooled[best_single]["spearman"],
            "goal_loto_ge_0.85_and_above_every_signal": bool(
                pooled["cost_model"]["spearman"] >= 0.85
                and all(
                    pooled["cost_model"]["spearman"] > pooled[s]["spearman"]
                    for s in SIGNALS
                    if not math.isnan(pooled[s]["spearman"])
                )
            ),
            "loto_interval_coverage": loto_summary["coverage"],
        },
        "thresholds": {"reuse_threshold": thr["reuse_threshold"], "rebuild_threshold": thr["rebuild_threshold"]},
        "cost_model_full_fit": full_model.explain(),
        "timing_s": {
            "dist": t_dist,
            "tasks": t_task,
            "analysis": t_analysis,
            "total": time.perf_counter() - t_start,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "loto_summary.json").write_text(json.dumps(loto_summary, indent=1, default=float))
    log.info("goals: %s", json.dumps(summary["goals"], default=float))
    log.info("done in %.1f s; outputs in %s", summary["timing_s"]["total"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
