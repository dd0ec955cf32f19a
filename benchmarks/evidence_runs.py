"""The evidence benchmark's measurements: the gate's signals on shifted data and new tasks, and what retraining cost.

Used by ``evidence.py`` (run it, not this module). One row per run: the signals, then the fine-tuning cost and the
rebuild cost (columns prefixed ``rebuild_``).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from resque_airflow.core import FeatureSummary
    from resque_airflow.examples.digits import DigitsSplits
    from resque_airflow.runtime.training import RetrainCost

log = logging.getLogger("evidence")

SHIFT_SEED_OFFSETS = {"train": 1, "heldout": 2, "test": 3}  # distinct noise per split, derived from the run seed


def summarise(model: nn.Module, x: np.ndarray, labels: np.ndarray | None, num_classes: int = 10) -> FeatureSummary:
    """A ``FeatureSummary`` of ``x`` under ``model``: pooled representation, logits and (optional) labels."""
    from workloads import embed

    from resque_airflow.core import FeatureSummary

    feats, logits = embed(model, x)
    s = FeatureSummary(num_classes, feats.shape[1], seed=0)
    s.update(feats, logits=logits, labels=labels)
    return s


def calibration_columns(reference: FeatureSummary, new: FeatureSummary) -> dict:
    """The calibrated view of a run (the gate's own ``calibrate``), with labels and label-free.

    ``null_q`` / ``p_value`` / ``detected``: RESQUE_dist against its null at alpha = 0.01 and this batch size;
    ``interval_*``: the 90% bootstrap interval; ``accuracy`` (measured) and ``atc_accuracy`` (estimated without
    labels); ``_predicted`` columns: the same under the model's own predicted labels.
    """
    from resque_airflow.core.calibration import calibrate

    out: dict = {"reference_accuracy": reference.accuracy, "n_new": new.n}
    for source, suffix in (("given", ""), ("predicted", "_predicted")):
        cal = calibrate(reference, new, label_source=source)
        out |= {
            f"null_q{suffix}": cal.detection.quantile, f"p_value{suffix}": cal.detection.p_value,
            f"detected{suffix}": int(cal.detection.detected), f"interval_low{suffix}": cal.interval[0],
            f"interval_high{suffix}": cal.interval[1],
        }  # fmt: skip
        if source == "given":
            for name, acc in (("accuracy", cal.measured), ("atc_accuracy", cal.estimated)):
                out |= {name: None, f"{name}_low": None, f"{name}_high": None}
                if acc is not None:
                    out |= {name: acc.value, f"{name}_low": acc.low, f"{name}_high": acc.high}
    return out


def cost_columns(cost: RetrainCost, prefix: str = "") -> dict:
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


def run_dist(cfg, splits: DigitsSplits, source: nn.Module, reference: FeatureSummary, target: float) -> list[dict]:
    """One row per (shift type, severity, seed), plus ``none`` per seed: signals, fine-tune and rebuild costs.

    ``cfg`` is ``evidence.Config``; ``source`` the production model, ``reference`` its clean reference summary and
    ``target`` the held-out accuracy every fine-tune and rebuild must reach.
    """
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
            new = summarise(source, data["test"], splits.test.y)
            signals = companion_signals(reference, new) | calibration_columns(reference, new)
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


def run_tasks(cfg, splits: DigitsSplits, source: nn.Module, reference: FeatureSummary) -> list[dict]:
    """One row per (new task, seed): RESQUE_task variants, label-free signals, fine-tune (new head), rebuild costs."""
    from workloads import embed, make_task, replace_head

    from resque_airflow.core import companion_signals, resque_task
    from resque_airflow.examples.digits import make_model
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
