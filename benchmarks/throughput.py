"""Throughput and memory of the RESQUE gate against its peers, on the same model and the same data.

Usage::

    python benchmarks/throughput.py [--quick | --standard] [--json] [--out docs/performance/standard-1.json]
        [--provider cpu|cuda]

Paths, each in a fresh subprocess so that its peak RSS (``VmHWM``) is its own:

- ``gate``: the product's scoring path end to end from data on disk, :func:`resque_airflow.runtime.pipeline.score_dist`
  (reader -> ONNX Runtime with the pooled layer exposed in-graph -> class sums -> RESQUE_dist and the companion
  signals), excluding only the registry calls; the fingerprint is computed beforehand. Timed from the call to its
  return, so session creation counts. The exposed-model cache (``runtime/exposed.py``, in the work folder) is warm,
  as it is for a scheduled gate on its production model: one cold run first (graph edit, ``onnx`` import, cache
  write) is reported as ``gate_npz_cold``. Run on ``.npz`` shards and on an image folder (PNG files in class
  sub-folders), and on 10x the ``.npz`` data for ``rss_ratio_10x``.
- ``ort``: bare ONNX Runtime inference of the unmodified model (logits only) on in-memory batches, session created and
  warmed up beforehand: the ceiling for the gate.
- ``torch``: torch eager, batched, ``inference_mode``, with a forward hook on the same layer (global average pooling of
  its output) and float64 class sums (one-hot matrix product).
- ``reference``: the procedure as published: torch, batch 1, one pass per class (for each class, its samples one at a
  time), a forward hook on the layer, pooled features summed per class.

Every path that yields class sums is scored against the same fingerprint; the JSON reports each RESQUE_dist and the
largest difference. Throughput is images per second (median over repeats). Also measured: RESQUE_task on
50,000 x 512 features with 10 classes, the cost of the data hash, and (full run only) the gate task's wall time inside
Airflow (``dag.test`` of ``dags/resque_gate.py`` against a SQLite MLflow registry), split into start-up and scoring.

The top-level ratios are those of the first model (ResNet-18) on ``.npz`` shards; ``models`` holds every model's.

Code: ``throughput_workers.py`` (the paths), ``workloads.py`` (the synthetic images), ``machine.py`` (machine facts,
RSS), ``models.py`` (the torch models); this file sets up, runs the paths in subprocesses and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_share, cpu_ticks, loadavg, machine_info, physical_cores
from throughput_workers import WORKERS
from workloads import IMAGE_SPEC, NUM_CLASSES, write_npz_shards, write_png_folder

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
REFERENCE_SWEEP_IMAGES = 300
TARGETS = {"gate_vs_ort": 0.95, "gate_vs_torch": 1.2, "gate_vs_reference": 2.0, "rss_ratio_10x": 1.1}
GPU_TARGETS = {"gate_vs_reference": 20.0}
QUICK_NOTE = (
    "--quick: a smoke test only. Its ratios are NOT figures: a run this small measures process start-up and session "
    "creation more than throughput. Use --standard for figures."
)


# ----------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process (throughput_workers.py) and prints one JSON line
# ----------------------------------------------------------------------------------------------------------------
def run_worker(kind: str, spec: dict, *, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run one worker in a fresh Python process; return its JSON result (with ``wall_s`` of the process)."""
    t0, load0, ticks0 = time.perf_counter(), loadavg(), cpu_ticks()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["process_wall_s"] = time.perf_counter() - t0
    # The whole child's CPU time (imports and set-up included; the path's own is the worker's ``cpu_seconds``).
    out["process_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out["load_before"], out["load_after"] = load0, loadavg()
    # The machine's busy / idle / stolen shares while the worker ran: hypervisor steal slows every path without
    # showing in the load average.
    out["machine_cpu"] = cpu_share(ticks0, cpu_ticks())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Set-up and the other measurements
# ----------------------------------------------------------------------------------------------------------------
def prepare_model(name: str, work: Path) -> dict:
    """Export the model with its layer recorded (what the registry holds), the unmodified model (logits only, for
    the ``ort`` ceiling) and the torch weights."""
    import onnx
    import torch

    sys.path.insert(0, str(HERE))
    from models import MODELS

    from resque_airflow.runtime.export import export_torch

    build, layer = MODELS[name]
    model = build()
    path = work / f"{name}.onnx"
    export_torch(model, torch.randn(2, 3, 32, 32), path, layer=layer)
    proto = onnx.load(str(path))
    keep = [o for o in proto.graph.output if o.name != layer]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    del proto.metadata_props[:]
    plain = work / f"{name}.plain.onnx"
    onnx.save(proto, str(plain))
    weights = work / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return {"onnx": str(path), "plain": str(plain), "weights": str(weights), "layer": layer}


def fingerprint(model: dict, reference_png: Path, out: Path, provider: str) -> tuple[str, int]:
    """Fingerprint ``model`` (:func:`prepare_model`) on the reference PNG folder into ``out``; (folder, width D)."""
    from resque_airflow.core import ImageSpec
    from resque_airflow.runtime.pipeline import fingerprint_model

    spec = ImageSpec(**IMAGE_SPEC)
    fp = fingerprint_model(model["onnx"], str(reference_png), provider=provider, image_spec=spec)
    fp.save(out)
    return str(out), fp.dim


def time_resque_task(rows: int, dim: int = 512, repeats: int = 3) -> dict:
    """RESQUE_task (k-means at the class centroids, ARI) on ``rows`` x ``dim`` clustered features, 10 classes."""
    from resque_airflow.core import resque_task
    from resque_airflow.runtime.pipeline import DEFAULT_TASK_MAX_SAMPLES

    rng = np.random.default_rng(0)
    y = rng.integers(0, NUM_CLASSES, rows)
    # Class centres 0.15 apart per feature in unit noise: the classes overlap, as a new task's do, so k-means needs
    # its Lloyd iterations (well-separated blobs converge in one and would flatter the timing).
    x = (rng.normal(0, 0.15, (NUM_CLASSES, dim))[y] + rng.normal(0, 1, (rows, dim))).astype(np.float32)
    out = {"rows": rows, "dim": dim, "classes": NUM_CLASSES}
    for key, max_samples in (("full", None), ("max_samples", DEFAULT_TASK_MAX_SAMPLES)):
        if max_samples is not None and max_samples >= rows:
            continue
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            score = resque_task(x, y, max_samples=max_samples)
            times.append(time.perf_counter() - t0)
        out[key] = {"seconds": statistics.median(times), "repeats": times, "value": score.value, "n": score.n_samples}
        if max_samples is not None:
            out[key]["max_samples"] = max_samples
    return out


def time_hash(n: int, dim: int, batch: int) -> dict:
    """What the data hash in pipeline._stream costs: sha256 over ``n`` x ``dim`` float32 features and labels."""
    feats = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    labels = np.zeros(n, np.int64)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for i in range(0, n, batch):
        h.update(feats[i : i + batch])
        h.update(labels[i : i + batch])
    return {"n": n, "dim": dim, "seconds": time.perf_counter() - t0}


def airflow_gate(work: Path, model: dict, n: int, provider: str) -> dict:
    """Publish the model to a SQLite MLflow registry, migrate an Airflow DB, and time the gate task in ``dag.test``."""
    from resque_airflow.core import ImageSpec
    from resque_airflow.registry.publish import publish_model

    home = work / "airflow"
    home.mkdir(exist_ok=True)
    db = work / "mlflow.db"
    tracking = f"sqlite:///{db.resolve()}"
    ref = work / "airflow-ref"
    new = work / "airflow-new"
    write_npz_shards(ref, n, seed=71, shift=0.0)
    write_npz_shards(new, n, seed=72, shift=0.5)
    t0 = time.perf_counter()
    publish_model(
        tracking_uri=tracking,
        name="bench-resnet18",
        model_path=model["onnx"],
        reference=str(ref),
        provider=provider,
        image_spec=ImageSpec(**IMAGE_SPEC),
    )
    publish_s = time.perf_counter() - t0
    env = dict(os.environ)
    env |= {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home.resolve()}/airflow.db",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "mlflow", "host": tracking}),
    }
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env)
    migrate_s = time.perf_counter() - t0
    out = run_worker("airflow", {"model_name": "bench-resnet18", "data": str(new), "n": n}, env=env)
    return out | {"publish_s": publish_s, "db_migrate_s": migrate_s, "model": "resnet18", "data_format": "npz"}


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------
def _median_fields(runs: list[dict]) -> dict:
    """One record for a path: the median of every numeric field over its runs (the maximum for peak RSS)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            out[key] = max(values) if key == "peak_rss_mb" else statistics.median(values)
    out["runs"] = len(runs)
    out["repeats"] = [r["images_per_s"] for r in runs]
    steal = [r["machine_cpu"]["steal_fraction"] for r in runs if r.get("machine_cpu")]
    out["steal_per_repeat"] = steal
    out["steal_fraction"] = statistics.median(steal) if steal else None
    return out


def bench_model(name: str, work: Path, args, log) -> dict:
    """Every path of one model on the same data, interleaved over the repeats; its paths, ratios and targets met."""
    log(f"[{name}] exporting")
    model = prepare_model(name, work)
    d = work / name
    n, n_ref = args.n, args.n_ref
    log(f"[{name}] writing data: {n} new images as .npz and PNG, {n_ref} reference images")
    write_png_folder(d / "ref-png", n_ref, seed=1, shift=0.0)
    write_npz_shards(d / "new-npz", n, seed=2, shift=0.5)
    write_png_folder(d / "new-png", n, seed=2, shift=0.5)
    fp_dir, dim = fingerprint(model, d / "ref-png", d / "fingerprint", args.provider)
    base = {"provider": args.provider, "batch_size": args.batch_size, "fingerprint": fp_dir, "threads": args.threads}
    tspec = base | {"model_name": name, "weights": model["weights"], "dim": dim, "data": str(d / "new-npz")}
    runs: dict[str, list[dict]] = {}
    loads: list = []

    def gate(data: Path, **extra) -> dict:
        return run_worker("gate", base | {"model": model["onnx"], "data": str(data)} | extra)

    log(f"[{name}] gate (npz) with an empty exposed-model cache; load {loadavg()}")
    # Publishing (the fingerprint above) caches the edit the gates ask for: empty the cache for the cold gate.
    shutil.rmtree(os.environ["RESQUE_CACHE_DIR"], ignore_errors=True)
    runs["gate_npz_cold"] = [gate(d / "new-npz")]
    # Interleave the paths within each repeat (ort and the gate back to back), so that a change of machine load
    # touches them alike; the ratios are then taken within each repeat and their median reported.
    for rep in range(args.repeats):
        log(f"[{name}] repeat {rep + 1}/{args.repeats}: ort, gate (npz), gate (images), torch; load {loadavg()}")
        loads.append(loadavg())
        runs.setdefault("ort", []).append(
            run_worker("ort", base | {"model": model["plain"], "data": str(d / "new-npz"), "repeats": 1})
        )
        runs.setdefault("gate_npz", []).append(gate(d / "new-npz"))
        runs.setdefault("gate_images", []).append(gate(d / "new-png"))
        runs.setdefault("torch", []).append(run_worker("torch", tspec | {"repeats": 1}))
        if args.statistics_off:  # the gate without the calibrated-decision statistics, right after the full gate
            runs.setdefault("gate_npz_nostats", []).append(gate(d / "new-npz", statistics=False))
    ref_threads, sweep = args.reference_threads, {}
    if ref_threads is None:  # measure and choose: the faster thread count on a prefix of the data
        for t in sorted({1, args.threads}):
            r = run_worker("reference", tspec | {"threads": t, "limit": REFERENCE_SWEEP_IMAGES})
            sweep[t] = {"images_per_s": r["images_per_s"], "cpu_ms_per_image": r["cpu_ms_per_image"],
                        "load_before": r["load_before"]}  # fmt: skip
        ref_threads = max(sweep, key=lambda t: sweep[t]["images_per_s"])
        log(f"[{name}] reference thread sweep on {REFERENCE_SWEEP_IMAGES} images: {sweep}; chose {ref_threads}")
    log(f"[{name}] reference (batch 1, per class, {ref_threads} thread(s)); load {loadavg()}")
    runs["reference"] = [run_worker("reference", tspec | {"threads": ref_threads})]
    if name in args.rss_models:
        log(f"[{name}] gate on 10x the data ({10 * n} images, .npz) for peak RSS; load {loadavg()}")
        write_npz_shards(d / "new-npz-10x", 10 * n, seed=3, shift=0.5)
        runs["gate_npz_10x"] = [gate(d / "new-npz-10x")]
    paths = {key: _median_fields(r) for key, r in runs.items()}

    def paired(a: str, b: str) -> dict:
        """Throughput ratio a/b within each repeat (median, min, max) and the ratio of the medians."""
        ratios = [x["images_per_s"] / y["images_per_s"] for x, y in zip(runs[a], runs[b], strict=False)]
        return {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "per_repeat": ratios,
            "of_medians": paths[a]["images_per_s"] / paths[b]["images_per_s"],
        }

    ratios = {
        "gate_vs_ort": paired("gate_npz", "ort"),
        "gate_vs_torch": paired("gate_npz", "torch"),
        "gate_vs_reference": paired("gate_npz", "reference") | {"note": "one reference run, against the gate median"},
        "gate_pass_vs_ort": {"median": statistics.median(
            g["pass_images_per_s"] / o["images_per_s"] for g, o in zip(runs["gate_npz"], runs["ort"], strict=False)
        )},
        "images_gate_vs_ort": paired("gate_images", "ort"),
        "images_gate_vs_torch": paired("gate_images", "torch"),
    }  # fmt: skip

    # CPU-time ratios: images per CPU-second of each path, gate over peer (>1: the gate spends less CPU per image).
    # They hold on a busy machine better than wall time, which counts the time a path waits for a core.
    def cpu_ratio(a: str, b: str) -> dict:
        ratios = [y["cpu_ms_per_image"] / x["cpu_ms_per_image"] for x, y in zip(runs[a], runs[b], strict=False)]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}

    ratios["cpu_gate_vs_ort"] = cpu_ratio("gate_npz", "ort")
    ratios["cpu_gate_vs_torch"] = cpu_ratio("gate_npz", "torch")
    ratios["cpu_gate_vs_reference"] = cpu_ratio("gate_npz", "reference")
    if "gate_npz_nostats" in runs:
        ratios["statistics_cost"] = paired("gate_npz", "gate_npz_nostats") | {
            "cpu": cpu_ratio("gate_npz", "gate_npz_nostats"),
            "note": "gate with the calibrated-decision statistics over the gate without them (replicates=1, no "
            "calibrate); target >= 0.95",
        }
    ratios["gate_vs_reference"]["median"] = ratios["gate_vs_reference"]["of_medians"]
    dists = {k: p["dist"] for k, p in paths.items() if "dist" in p and not k.endswith("10x")}
    out = {
        "model": name,
        "layer": model["layer"],
        "dim": dim,
        "n": n,
        "n_reference": n_ref,
        "batch_size": args.batch_size,
        "data_format": "npz",
        "load_per_repeat": loads,
        "threads": args.threads,
        "reference_threads": ref_threads,
        "reference_thread_sweep": sweep,
        "paths": paths,
        "ratios": ratios,
        "gate_vs_ort": ratios["gate_vs_ort"]["median"],
        "gate_vs_torch": ratios["gate_vs_torch"]["median"],
        "gate_vs_reference": ratios["gate_vs_reference"]["median"],
        "rss_vs_ort": paths["gate_npz"]["peak_rss_mb"] / paths["ort"]["peak_rss_mb"],
        "rss_vs_ort_cold": paths["gate_npz_cold"]["peak_rss_mb"] / paths["ort"]["peak_rss_mb"],
        "gate_cold_vs_ort": paths["gate_npz_cold"]["images_per_s"] / paths["ort"]["images_per_s"],
        "dist": dists,
        "max_dist_diff": max(dists.values()) - min(dists.values()),
    }
    if "gate_npz_10x" in paths:
        out["rss_ratio_10x"] = paths["gate_npz_10x"]["peak_rss_mb"] / paths["gate_npz"]["peak_rss_mb"]
    out["met"] = {k: _meets(k, out.get(k), v) for k, v in args.targets.items() if k in out}
    return out


def _meets(key: str, value: float | None, target: float) -> bool:
    return value is not None and (value <= target if key == "rss_ratio_10x" else value >= target)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one path in this process); print and write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small n, one repeat, no Airflow run (smoke test, no figures)")
    p.add_argument(
        "--standard",
        action="store_true",
        help="2,000 images, 5 interleaved repeats, ResNet-18 and ViT, the gate without its statistics too, no Airflow",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--out", type=Path, help="also write the JSON there")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"), help="where every path runs")
    p.add_argument("--models", default="resnet18,vit")
    p.add_argument("--n", type=int, help="new images per model (default 4000, quick 256)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every path (default: the gate's)")
    p.add_argument("--repeats", type=int, help="repeats of gate/ort (default 3, quick 1)")
    p.add_argument("--rss-models", default="resnet18", help="models whose gate also runs on 10x the data")
    p.add_argument("--skip-airflow", action="store_true")
    p.add_argument("--threads", type=int, help="intra-op threads of every batched path (default: the gate's own)")
    p.add_argument(
        "--reference-threads",
        type=int,
        help="torch threads of the batch-1 reference (default: measured, 1 or --threads, whichever is faster)",
    )
    p.add_argument("--statistics-off", action="store_true", help="also run the gate without replicates and null")
    p.add_argument("--workdir", type=Path, help="keep the data and models there (default: a temporary folder)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        print(json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return 0

    from resque_airflow.runtime.pipeline import DEFAULT_BATCH_SIZE
    from resque_airflow.runtime.session import intra_op_threads

    if args.quick and args.standard:
        p.error("--quick and --standard exclude each other")
    if args.standard:
        args.n = args.n or 2000
        # Five pairs, not three: on this kind of VM one pair's ratio varies by +-8% (two 3-repeat runs differed by
        # up to 14%, docs/PERFORMANCE.md), and the median of five halves the chance of a stray pair deciding it.
        args.repeats = args.repeats or 5
        args.skip_airflow = True
        args.statistics_off = True
    # Every batched path runs on the thread count the gate's session picks (ONNX Runtime's default where
    # intra_op_threads() keeps it: one per physical core), so that no path is handed more cores than another.
    args.threads = args.threads or intra_op_threads() or physical_cores()
    if args.quick and args.reference_threads is None:  # a smoke test has no time for the sweep
        args.reference_threads = 1
    args.n = args.n or (256 if args.quick else 4000)
    args.n_ref = min(args.n, 2000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    args.rss_models = {m.strip() for m in args.rss_models.split(",")}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    args.targets = TARGETS | (GPU_TARGETS if args.provider == "cuda" else {})
    report: dict = {
        "benchmark": "throughput",
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "standard": args.standard,
        "note": QUICK_NOTE if args.quick else None,
        "reference_threads": args.reference_threads,
        "provider": args.provider,
        "machine": machine_info(),
        "load_before": loadavg(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "targets": args.targets,
    }
    ctx = tempfile.TemporaryDirectory(prefix="resque-bench-") if args.workdir is None else contextlib.nullcontext()
    with ctx as tmp:
        work = Path(tmp) if tmp else args.workdir
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "exposed-cache"  # every worker inherits it; a fresh folder per run: the first gate is cold
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["RESQUE_CACHE_DIR"] = str(cache)
        report["models"] = {name: bench_model(name, work, args, log) for name in models}
        first = report["models"][models[0]]
        report |= {
            k: first.get(k)
            for k in ("model", "data_format", "n", "gate_vs_ort", "gate_vs_torch", "gate_vs_reference",
                      "rss_ratio_10x", "rss_vs_ort", "max_dist_diff", "ratios")
        }  # fmt: skip
        for key in ("gate_npz", "gate_npz_cold", "gate_images", "ort", "torch", "reference", "gate_npz_10x"):
            if key in first["paths"]:
                report[f"{key}_images_per_s"] = first["paths"][key]["images_per_s"]
                report[f"{key}_peak_rss_mb"] = first["paths"][key]["peak_rss_mb"]
        report["max_dist_diff_all"] = max(m["max_dist_diff"] for m in report["models"].values())
        log("RESQUE_task timing")
        report["resque_task"] = time_resque_task(5_000 if args.quick else 50_000, repeats=1 if args.quick else 3)
        report["data_hash"] = time_hash(args.n, 512, args.batch_size)
        if not (args.quick or args.skip_airflow) and "resnet18" in models:
            log("Airflow: publish, db migrate, dag.test of resque_gate on 1,000 images")
            model = {"onnx": str(work / "resnet18.onnx")}
            report["airflow"] = airflow_gate(work, model, 1000, args.provider)
    report["load_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - t_start
    report["met"] = {k: _meets(k, report.get(k), v) for k, v in report["targets"].items()}
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.quick:
        print(QUICK_NOTE, file=sys.stderr)
    if args.json:
        print(text)
    else:
        print(summary_table(report))
        if args.quick:
            print("\n" + QUICK_NOTE)
    return 0


def summary_table(report: dict) -> str:
    """A Markdown table of every model's paths (images/s and peak RSS) and the ratios."""
    lines = [
        "| model | path | images/s | wall (s) | CPU (s) | CPU ms/image | peak RSS (MiB) | load 1-min before/after "
        "| RESQUE_dist |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, m in report["models"].items():
        for key, p in m["paths"].items():
            dist = f"{p['dist']:.8f}" if "dist" in p else ""
            load = f"{(p.get('load_before') or [0])[0]:.2f} / {(p.get('load_after') or [0])[0]:.2f}"
            lines.append(
                f"| {name} | {key} | {p['images_per_s']:.1f} | {p.get('seconds', float('nan')):.2f} "
                f"| {p.get('cpu_seconds', float('nan')):.2f} | {p.get('cpu_ms_per_image', float('nan')):.2f} "
                f"| {p['peak_rss_mb']:.0f} | {load} | {dist} |"
            )
    lines += ["", "| model | gate_vs_ort | gate_vs_torch | gate_vs_reference | rss_ratio_10x | max dist diff |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, m in report["models"].items():
        rss = f"{m['rss_ratio_10x']:.3f}" if "rss_ratio_10x" in m else "-"
        lines.append(
            f"| {name} | {m['gate_vs_ort']:.3f} | {m['gate_vs_torch']:.2f} | {m['gate_vs_reference']:.2f} | {rss} "
            f"| {m['max_dist_diff']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
