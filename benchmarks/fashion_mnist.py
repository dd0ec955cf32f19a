"""Fashion-MNIST evidence benchmark: does RESQUE track retraining cost for a ResNet-18 and a ViT at the paper's setup?

Usage (from the repository root, in the project's virtualenv)::

    python benchmarks/fashion_mnist.py [--quick] [--device cpu|cuda] [--out docs/evidence/fashion] [--jobs 2]

Setup (DESIGN.md 2.x; the data, shifts and tasks are in ``fashion_data.py``, the models in ``fashion_models.py``):

1. Data: Debian's ``dataset-fashion-mnist`` (``scripts/install-fashion-mnist.sh``). A stratified subset of the
   official training set is cut 50/30/20 per class into ``split_0, split_1, split_2``; a stratified subset of the
   official test set measures accuracy. Images stay 28x28 grey, ``(N, 1, 28, 28)`` float32 in [0, 1].
2. Per model family (``resnet18``: CIFAR-style ResNet-18 of 8 base channels, representation ``layer4.1.conv2``;
   ``vit``: a small ViT, representation its final LayerNorm ``norm``, mean-pooled over tokens), the source model is
   trained on the clean ``split_0 U split_2``; its accuracy on the clean test subset sets the retraining target,
   ``TARGET_RELATIVE`` x that accuracy.
3. Scoring by the product's own path: torch -> ``export_torch`` -> ONNX -> ``fingerprint_model`` (reference: the clean
   source data) -> ``score_dist`` of the shifted retraining data ``split_1 U split_2`` (given labels; the companion
   signals come from the same pass). Every field of ``ScoreResult.to_dict()`` is recorded, flattened.
4. Cost by the product's ``fine_tune``: the source model fine-tuned on the shifted retraining data until accuracy on
   the shifted test subset reaches the target (checked every quarter epoch, capped: runs that do not get there are
   kept as censored); a freshly initialised model with the same recipe gives the rebuild cost.
5. Task shift: new tasks (``fashion_data.make_tasks``) scored with ``score_task`` and fine-tuned with a new head.
6. Analysis (``fashion_analysis.py``): correlations with bootstrap intervals per family and shift type and pooled,
   with and without censored runs; leave-one-shift-type-out for ``CostModel``; the paper's claims; plots.

Outputs (in ``--out``): ``dist_runs.csv``, ``task_runs.csv`` (the digits benchmark's columns plus ``model_family``,
``censored``, ``accuracy_at_cap`` and the flattened gate result ``gate_*``), ``correlations_dist.csv``,
``correlations_task.csv``, ``loto.csv``, ``report.md``, ``summary.json`` and PNG plots per family.
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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fashion_data as fd  # the benchmark's sibling modules, found through the line above
from evidence_report import write_csv

log = logging.getLogger("fashion")

TARGET_RELATIVE = 0.95  # retraining target: this fraction of the source model's clean test accuracy
SEED_OFFSETS = {"retrain": 1, "test": 2}  # distinct shift randomness per split, derived from the run seed


@dataclass
class Config:
    """Sizes and recipe of one run. ``full()`` is what docs/EVIDENCE.md reports; ``quick()`` is the CI smoke test."""

    families: tuple[str, ...]
    seeds: tuple[int, ...]
    severities: dict[str, tuple[float, ...]]
    tasks: tuple[str, ...]
    train_per_class: int = 160  # training subset: split_0 / split_1 / split_2 = 80 / 48 / 32 per class
    test_per_class: int = 40  # accuracy checks (the "shifted official test set", subset)
    source_epochs: int = 15  # training of each source model (fixed length, no early stop)
    cap_epochs: float = 3.0  # cap of every fine-tune / rebuild run
    # SGD learning rates, the same for source training, fine-tuning and rebuilding (one-seed pilot on clean data,
    # official test accuracy: ResNet 0.05 / 0.01 -> 0.820 / 0.810; ViT 0.05 / 0.01 / 0.003 -> 0.639 / 0.714 / 0.733)
    lr: dict[str, float] = field(default_factory=lambda: {"resnet18": 0.05, "vit": 0.005})
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 32
    target_relative: float = TARGET_RELATIVE
    rebuild_seeds: tuple[int, ...] = (0,)  # a rebuild (fresh init) is run for these seeds only, and only for
    rebuild_levels: tuple[int, ...] = (2,)  # these severity indices of each shift type (plus no shift, every task)
    width: int = 8  # ResNet-18 base channels
    n_boot: int = 2000
    split_seed: int = 0
    model_seed: int = 0
    measure_energy: bool = True
    device: str = "cpu"

    @classmethod
    def full(cls) -> Config:
        return cls(
            families=("resnet18", "vit"),
            seeds=(0, 1, 2),
            severities=dict(fd.SEVERITIES),
            tasks=("fashion_groups4", "fashion_upper4", "fashion_footwear3", "fashion_parity", "digits28",
                   "fashion_on_digits_model"),
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Config:
        sev = fd.SEVERITIES
        return cls(
            families=("resnet18",),
            seeds=(0,),
            severities={"gaussian_noise": (sev["gaussian_noise"][0], *sev["gaussian_noise"][2:4]),
                        "contrast": (sev["contrast"][0], *sev["contrast"][2:4])},
            tasks=("fashion_groups4", "digits28"),
            train_per_class=40,
            test_per_class=20,
            source_epochs=6,
            cap_epochs=1.0,
            n_boot=100,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The product's path
# ----------------------------------------------------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    """``d`` as one flat dict: nested dicts joined with ``_``; short numeric lists as ``key_0, key_1, ...``; other
    lists as JSON text. Whatever keys the product adds later show up as columns without a change here."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}_"))
        elif isinstance(v, (list, tuple)):
            if 0 < len(v) <= 4 and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                out.update({f"{key}_{i}": e for i, e in enumerate(v)})
            else:
                out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def gate_columns(result) -> dict:
    """A ``ScoreResult`` as CSV columns: its ``signals`` at the top level (the digits CSV's names), every other
    field of ``to_dict()`` as ``gate_<field>``."""
    d = result.to_dict()
    signals = d.pop("signals", {}) or {}
    return flatten(signals) | flatten(d, "gate_")


@dataclass
class Scorer:
    """A source model exported to ONNX with its fingerprint: the gate's view of one production model."""

    family: str
    onnx_path: str
    fingerprint: object
    provider: str
    export: dict


def make_scorer(model, family: str, reference: fd.Split, workdir: Path, name: str, provider: str) -> Scorer:
    """Export ``model`` with its representation layer and fingerprint it on labelled ``reference`` data."""
    import torch
    from fashion_models import LAYERS

    from resque_airflow.runtime.export import export_torch
    from resque_airflow.runtime.pipeline import fingerprint_model

    model = copy.deepcopy(model).cpu().eval()
    path = workdir / f"{name}.onnx"
    rep = export_torch(model, torch.zeros(2, 1, 28, 28), path, layer=LAYERS[family])
    ref = fd.write_npz(workdir / f"{name}_reference.npz", reference.x, reference.y)
    fp = fingerprint_model(str(path), ref, layer=LAYERS[family], provider=provider)
    return Scorer(family, str(path), fp, provider, asdict(rep))


def score_dist(scorer: Scorer, x: np.ndarray, y: np.ndarray | None, workdir: Path, label_source: str = "given"):
    """``pipeline.score_dist`` of ``(x, y)`` against the scorer's fingerprint (written to a temporary .npz)."""
    from resque_airflow.runtime.pipeline import score_dist as product_score_dist

    path = fd.write_npz(workdir / "incoming.npz", x, y)
    return product_score_dist(scorer.onnx_path, scorer.fingerprint, path, label_source=label_source,
                              provider=scorer.provider)  # fmt: skip


def score_task(scorer: Scorer, x: np.ndarray, y: np.ndarray, workdir: Path, init: str = "centroids"):
    """``pipeline.score_task`` of labelled new-task data under the scorer's model."""
    from fashion_models import LAYERS

    from resque_airflow.runtime.pipeline import score_task as product_score_task

    path = fd.write_npz(workdir / "task.npz", x, y)
    return product_score_task(scorer.onnx_path, path, layer=LAYERS[scorer.family], provider=scorer.provider,
                              init=init)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Costs
# ----------------------------------------------------------------------------------------------------------------------


def cost_columns(cost, prefix: str = "") -> dict:
    """The digits CSV's measured-cost columns (``evidence_runs.cost_columns``), plus ``accuracy_at_cap``: the
    held-out accuracy at the cap for censored runs (runs that reached the target stopped there: empty)."""
    from evidence_runs import cost_columns as digits_cost_columns

    return digits_cost_columns(cost, prefix) | {
        f"{prefix}accuracy_at_cap": cost.final_accuracy if cost.censored else None
    }


def train(cfg: Config, model, train_split: fd.Split, heldout: fd.Split, *, target: float, epochs: float, seed: int,
          energy: bool | None = None, stop: bool = True):  # fmt: skip
    """The benchmark's one training recipe (source models, fine-tuning, rebuilding): the product's ``fine_tune``."""
    from resque_airflow.runtime.training import fine_tune

    return fine_tune(
        model.to(cfg.device), train_split.x, train_split.y, heldout.x, heldout.y, target_accuracy=target,
        max_epochs=epochs, lr=cfg.lr[_family_of(model)], batch_size=cfg.batch_size, seed=seed,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, stop_at_target=stop,
        measure_energy=cfg.measure_energy if energy is None else energy,
    )  # fmt: skip


def _family_of(model) -> str:
    return "vit" if type(model).__name__ == "ViT" else "resnet18"


def train_source(cfg: Config, family: str, num_classes: int, data: fd.Split, heldout: fd.Split, seed: int):
    """A source model of ``family`` trained for ``cfg.source_epochs`` on clean ``data`` (no early stop)."""
    from fashion_models import make_model

    model = make_model(family, num_classes, seed=seed, width=cfg.width)
    cost = train(cfg, model, data, heldout, target=2.0, epochs=cfg.source_epochs, seed=seed, energy=False, stop=False)
    return model.eval(), cost


def full_test_accuracy(model, split: fd.Split, device: str) -> float:
    """Top-1 accuracy on a whole split (e.g. the official 10,000 test images)."""
    import torch

    from resque_airflow.runtime.training import accuracy

    return accuracy(model.to(device), torch.as_tensor(split.x, device=device), torch.as_tensor(split.y, device=device))


# ----------------------------------------------------------------------------------------------------------------------
# One model family
# ----------------------------------------------------------------------------------------------------------------------


def _append_csv(path: Path, row: dict) -> None:
    """Append one row to a progress CSV (header from the first row; for watching a long run, not for analysis)."""
    new = not path.exists()
    if new:
        fields = list(row)
    else:
        with open(path, newline="") as f:
            fields = next(csv.reader(f))  # later rows may lack columns (no rebuild) or add some: keep the header's
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def run_dist(cfg: Config, family: str, splits: fd.PaperSplits, source, scorer: Scorer, target: float,
             workdir: Path, progress: Path) -> list[dict]:  # fmt: skip
    """One row per (shift type, severity, seed), plus ``none`` per seed: gate result, fine-tune (and rebuild) cost."""
    from fashion_models import make_model

    settings = [("none", 0.0)] + [(s, v) for s, levels in cfg.severities.items() for v in levels]
    rows = []
    for i, (shift, severity) in enumerate(settings):
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            load1 = os.getloadavg()[0]
            off = 1000 * seed
            retrain = fd.Split(fd.apply_shift(splits.retrain.x, shift, severity, off + SEED_OFFSETS["retrain"]),
                               splits.retrain.y)  # fmt: skip
            test = fd.Split(fd.apply_shift(splits.test.x, shift, severity, off + SEED_OFFSETS["test"]), splits.test.y)
            result = score_dist(scorer, retrain.x, retrain.y, workdir)
            signal_s = time.perf_counter() - t0
            ft = train(cfg, copy.deepcopy(source), retrain, test, target=target, epochs=cfg.cap_epochs, seed=seed)
            row = {"model_family": family, "shift_type": shift, "severity": severity, "seed": seed}
            row |= gate_columns(result) | cost_columns(ft)
            level = cfg.severities[shift].index(severity) if shift != "none" else None
            if seed in cfg.rebuild_seeds and (level is None or level in cfg.rebuild_levels):
                fresh = make_model(family, 10, seed=100 + seed, width=cfg.width)
                row |= cost_columns(train(cfg, fresh, retrain, test, target=target, epochs=cfg.cap_epochs, seed=seed),
                                    "rebuild_")  # fmt: skip
            row |= {"signal_s": signal_s, "run_s": time.perf_counter() - t0, "load1": load1}
            rows.append(row)
            _append_csv(progress, row)
            log.info(
                "%s [%d/%d] %-15s sev=%-7.4g seed=%d resque_dist=%.4f steps=%d%s acc=%.3f (%.0fs, load %.1f)",
                family, i + 1, len(settings), shift, severity, seed, row["resque_dist"], ft.steps_to_target,
                "+" if ft.censored else "", ft.final_accuracy, row["run_s"], load1,
            )  # fmt: skip
    return rows


def run_tasks(cfg: Config, family: str, splits: fd.PaperSplits, scorers: dict[str, Scorer], sources: dict,
              workdir: Path, progress: Path) -> list[dict]:  # fmt: skip
    """One row per (new task, seed): RESQUE_task (centroid and k-means++ init), label-free signals, fine-tune with a
    new head, rebuild. ``fashion_on_digits_model`` runs on the digits source model; every other task on the
    Fashion-MNIST one."""
    from fashion_models import make_model, replace_head

    rows = []
    for task in fd.make_tasks(splits, sources["digits_data"], cfg.tasks):
        src = "digits" if task.name == "fashion_on_digits_model" else "fashion"
        scorer, source = scorers[src], sources[src]
        t0 = time.perf_counter()
        res = score_task(scorer, task.train.x, task.train.y, workdir)
        pp = score_task(scorer, task.train.x, task.train.y, workdir, init="k-means++")
        free = score_dist(scorer, task.train.x, None, workdir, label_source="predicted")
        signals = gate_columns(res)
        signals["resque_task_kmeanspp"] = pp.score
        signals["resque_task_flat"] = None  # the product pools inside the ONNX graph: no flattened-feature variant
        for k, v in gate_columns(free).items():
            if not k.startswith("gate_") and k not in signals:
                signals[k] = v
            elif k.startswith("gate_"):
                signals[f"free_{k}"] = v
        signal_s = time.perf_counter() - t0
        # The task's attainable accuracy within the cap: the better of a fresh model and the source model with a new
        # head, each trained for the whole cap (no early stop; seed 999, not one of the run seeds). A fresh model
        # alone is not enough here: on a few hundred images it stays near chance within a few epochs.
        ceilings = {
            "fresh": train(cfg, make_model(family, task.num_classes, seed=999, width=cfg.width), task.train,
                           task.heldout, target=2.0, epochs=cfg.cap_epochs, seed=999, energy=False, stop=False),
            "finetune": train(cfg, replace_head(copy.deepcopy(source), family, task.num_classes, seed=999),
                              task.train, task.heldout, target=2.0, epochs=cfg.cap_epochs, seed=999, energy=False,
                              stop=False),
        }  # fmt: skip
        ceiling = max(c.final_accuracy for c in ceilings.values())
        target = cfg.target_relative * ceiling
        for seed in cfg.seeds:
            model = replace_head(copy.deepcopy(source), family, task.num_classes, seed=seed)
            ft = train(cfg, model, task.train, task.heldout, target=target, epochs=cfg.cap_epochs, seed=seed)
            row = {"model_family": family, "task": task.name, "source": src, "num_classes": task.num_classes,
                   "n_train": len(task.train), "seed": seed, **signals, "ceiling_accuracy": ceiling,
                   "ceiling_fresh_accuracy": ceilings["fresh"].final_accuracy,
                   "ceiling_finetune_accuracy": ceilings["finetune"].final_accuracy,
                   "target_accuracy": target}  # fmt: skip
            row |= cost_columns(ft)
            if seed in cfg.rebuild_seeds:
                fresh = make_model(family, task.num_classes, seed=100 + seed, width=cfg.width)
                row |= cost_columns(train(cfg, fresh, task.train, task.heldout, target=target, epochs=cfg.cap_epochs,
                                          seed=seed), "rebuild_")  # fmt: skip
            row |= {"signal_s": signal_s, "load1": os.getloadavg()[0]}
            rows.append(row)
            _append_csv(progress, row)
            log.info("%s task %-24s seed=%d resque_task=%.3f target=%.3f epochs=%.2f%s", family, task.name, seed,
                     res.score, target, ft.epochs_to_target, "+" if ft.censored else "")  # fmt: skip
    return rows


def run_family(cfg: Config, family: str, out: str) -> dict:
    """Everything for one model family (a worker process): source models, distribution and task shift rows."""
    import torch

    _setup_logging()
    # One intra-op thread: on this 2-core machine shared with other jobs, more threads made training slower.
    torch.set_num_threads(1)
    out_path = Path(out)
    provider = "cuda" if cfg.device == "cuda" else "cpu"
    t_start = time.perf_counter()
    train_all, test_all = fd.load_fashion()
    splits = fd.paper_splits(train_all, test_all, cfg.train_per_class, cfg.test_per_class, seed=cfg.split_seed)
    digits = fd.load_digits_28(seed=cfg.split_seed)
    info: dict = {"family": family, "load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix=f"fashion_{family}_") as tmp:
        workdir = Path(tmp)
        source, cost = train_source(cfg, family, 10, splits.source, splits.test, cfg.model_seed)
        clean_acc = cost.final_accuracy
        target = cfg.target_relative * clean_acc
        info["source"] = {
            "clean_test_subset_accuracy": clean_acc,
            "clean_official_test_accuracy": full_test_accuracy(source, test_all, cfg.device),
            "target_accuracy": target, "train_wall_s": cost.wall_s, "parameters": _n_params(source),
        }  # fmt: skip
        log.info("%s source: clean test accuracy %.4f (official 10k: %.4f) -> target %.4f", family, clean_acc,
                 info["source"]["clean_official_test_accuracy"], target)  # fmt: skip
        scorers = {"fashion": make_scorer(source, family, splits.source, workdir, "fashion", provider)}
        sources = {"fashion": source, "digits_data": digits}
        info["export"] = scorers["fashion"].export
        if "fashion_on_digits_model" in cfg.tasks:
            dsrc, dcost = train_source(cfg, family, 10, digits[0], digits[1], cfg.model_seed)
            sources["digits"] = dsrc
            scorers["digits"] = make_scorer(dsrc, family, digits[0], workdir, "digits", provider)
            info["digits_source"] = {"clean_heldout_accuracy": dcost.final_accuracy, "train_wall_s": dcost.wall_s}
            log.info("%s digits source: held-out accuracy %.4f", family, dcost.final_accuracy)
        t0 = time.perf_counter()
        dist = run_dist(cfg, family, splits, source, scorers["fashion"], target, workdir,
                        out_path / f"progress_{family}_dist.csv")  # fmt: skip
        info["dist_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tasks = run_tasks(cfg, family, splits, scorers, sources, workdir, out_path / f"progress_{family}_tasks.csv")
        info["tasks_s"] = time.perf_counter() - t0
    info["total_s"] = time.perf_counter() - t_start
    info["load_end"] = os.getloadavg()
    return {"info": info, "dist": dist, "tasks": tasks}


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for name in ("codecarbon", "resque_airflow.runtime.training", "resque_airflow.runtime.session",
                 "resque_airflow.runtime.pipeline", "resque_airflow.runtime.export"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.WARNING)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny sizes, 1 seed, 2 shifts x 3 levels")
    parser.add_argument("--out", default="docs/evidence/fashion", help="output folder (created)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (ONNX provider too)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes, one family each (default: all)")
    parser.add_argument("--families", default=None, help="comma-separated subset of resnet18,vit")
    parser.add_argument("--no-energy", action="store_true", help="skip codecarbon (energy and emissions NaN)")
    args = parser.parse_args(argv)
    _setup_logging()

    try:
        fd.load_fashion()
    except fd.DataMissing as exc:
        print(str(exc).split(" (looked")[0], file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    commit = _git_commit()  # at the start: the code that ran, even if the tree moves on meanwhile
    load_start = os.getloadavg()
    cfg = Config.quick() if args.quick else Config.full()
    cfg.measure_energy = not args.no_energy
    cfg.device = args.device
    if args.families:
        cfg.families = tuple(f.strip() for f in args.families.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("progress_*.csv"):
        old.unlink()

    jobs = max(1, min(args.jobs or len(cfg.families), len(cfg.families)))
    if jobs == 1:
        results = [run_family(cfg, f, str(out)) for f in cfg.families]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            n = len(cfg.families)
            results = list(pool.map(run_family, [cfg] * n, cfg.families, [str(out)] * n))
    dist = [r for res in results for r in res["dist"]]
    tasks = [r for res in results for r in res["tasks"]]
    write_csv(out / "dist_runs.csv", dist)
    write_csv(out / "task_runs.csv", tasks)
    for old in out.glob("progress_*.csv"):
        old.unlink()

    import torch
    from fashion_analysis import analyse

    import resque_airflow

    t0 = time.perf_counter()
    analysis = analyse(dist, tasks, out, cfg.n_boot)
    argv_used = argv if argv is not None else sys.argv[1:]
    summary = {
        "command": " ".join(["python", "benchmarks/fashion_mnist.py", *argv_used]),
        "quick": args.quick,
        "git_commit": commit,
        "config": asdict(cfg),
        "sizes": {
            "train_subset": 10 * cfg.train_per_class,
            "split_0": round(10 * cfg.train_per_class * fd.SPLIT_FRACTIONS[0]),
            "split_1": round(10 * cfg.train_per_class * fd.SPLIT_FRACTIONS[1]),
            "split_2": round(10 * cfg.train_per_class * fd.SPLIT_FRACTIONS[2]),
            "source_train (split_0 U split_2)": round(10 * cfg.train_per_class * 0.7),
            "retrain (split_1 U split_2)": round(10 * cfg.train_per_class * 0.5),
            "test_subset": 10 * cfg.test_per_class,
            "input": "(N, 1, 28, 28) float32 in [0, 1]: grey, not resized",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads_per_worker": 1,
            "workers": jobs,
            "device": cfg.device,
            "resque_airflow": str(Path(resque_airflow.__file__).parent),
        },
        "load_average": {
            "start": load_start,
            "end": os.getloadavg(),
            "per_run_load1_mean": float(np.mean([r["load1"] for r in dist])) if dist else math.nan,
        },
        "families": {res["info"]["family"]: res["info"] for res in results},
        "n_dist_runs": len(dist),
        "n_task_runs": len(tasks),
        "censored_dist_runs": int(sum(r["censored"] for r in dist)),
        "censored_task_runs": int(sum(r["censored"] for r in tasks)),
        **analysis,
        "timing_s": {"total": time.perf_counter() - t_start, "analysis": time.perf_counter() - t0},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log.info("goals: %s", json.dumps(summary.get("goals"), default=float))
    log.info("done in %.0f s; outputs in %s", summary["timing_s"]["total"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
