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

Code: ``evidence_runs.py`` (the measurements), ``evidence_analysis.py`` (correlations, leave-one-out, thresholds),
``evidence_report.py`` (CSV, Markdown, plots), ``workloads.py`` (the new tasks); this file holds the sizes and
``main``.

Outputs (in ``--out``): ``dist_runs.csv``, ``task_runs.csv``, ``correlations_dist.csv``, ``correlations_task.csv``,
``correlations.md``, ``loto.csv``, ``loto.md``, ``learning_curve.csv``, ``thresholds.json``, ``thresholds.md``,
``summary.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
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
from evidence_analysis import (
    COSTS,
    SIGNALS,
    TASK_SIGNALS,
    column,
    correlation_table,
    dist_groups,
    learning_curve,
    loto,
    thresholds,
)
from evidence_report import correlations_md, loto_md, plots, task_means_md, write_csv
from evidence_runs import run_dist, run_tasks, summarise

log = logging.getLogger("evidence")

TARGET_RELATIVE = 0.95  # retraining target: this fraction of the production model's clean held-out accuracy


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
        from workloads import TASK_NAMES

        from resque_airflow.examples.digits import SEVERITIES

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


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with the command line ``argv``; write every output into ``--out``; return 0."""
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
    full_model = CostModel(SIGNALS).fit(dist_rows, column(dist_rows, "steps_to_target"))
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
        "censored_dist_runs": int(column(dist_rows, "censored").sum()),
        "censored_rebuild_runs": int(column(dist_rows, "rebuild_censored").sum()),
        "censored_task_runs": int(column(task_rows, "censored").sum()) if task_rows else 0,
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
