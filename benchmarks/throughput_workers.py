"""The throughput benchmark's measured paths. Each runs in its own process and returns one JSON-able dict.

``throughput.py --worker KIND SPEC`` runs :data:`WORKERS` ``[KIND]`` on the JSON ``SPEC`` and prints its result;
the process is fresh so that its peak RSS (``VmHWM``) is the path's own. That is why only numpy and the standard
library are imported at module level: torch, ONNX Runtime and the package are imported by the path that uses them.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from machine import peak_rss_mb, physical_cores
from workloads import NUM_CLASSES, load_npz_folder

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _rates(rates: list[float], cpus: list[float], n: int) -> dict:
    """The median of repeated timings of ``n`` images: images/s, wall and CPU seconds, CPU ms per image."""
    rate, cpu = statistics.median(rates), statistics.median(cpus)
    return {"images_per_s": rate, "seconds": n / rate, "cpu_seconds": cpu, "cpu_ms_per_image": 1000 * cpu / n,
            "repeats": rates, "n": int(n)}  # fmt: skip


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread included (``getrusage(RUSAGE_SELF)``)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _threads(spec: dict) -> int:
    """The thread count a path is pinned to: the spec's (the benchmark passes the gate's), else physical cores."""
    return int(spec.get("threads") or physical_cores())


def _without_statistics(pipeline) -> None:
    """Turn the calibrated-decision statistics off in ``pipeline``: one Poisson replicate per summary instead of the
    default, and no :func:`calibrate` after the pass (a stub that only carries an empty interval). What is left is
    the pass, RESQUE_dist and the companion signals: the gate as it was before the calibrated decision."""
    from types import SimpleNamespace

    base = pipeline.FeatureSummary

    class OneReplicate(base):
        def __init__(self, *args, **kwargs):
            kwargs["replicates"] = 1
            super().__init__(*args, **kwargs)

    pipeline.FeatureSummary = OneReplicate
    pipeline.calibrate = lambda *_a, **_k: SimpleNamespace(interval=(float("nan"), float("nan")))


def _sums_to_dist(fp_dir: str, sums: np.ndarray, counts: np.ndarray) -> float:
    from resque_airflow.core import ClassSums, Fingerprint, resque_dist

    fp = Fingerprint.load(fp_dir)
    return resque_dist(fp.summary.given, ClassSums.from_arrays(sums, counts)).value


def _instrument(pipeline, timings: dict[str, float]) -> None:
    """Wrap the pipeline's stages with timers (session creation, the streaming pass); wrapping changes nothing else.

    ``timings["session"]``: :class:`Embedder` construction (graph surgery + ONNX Runtime session);
    ``timings["pass"]``: :func:`summarise` (read, infer, accumulate). The rest of ``score_dist`` is scoring.
    """

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    class TimedEmbedder(pipeline.Embedder):
        def __init__(self, *args, **kwargs):
            t0 = time.perf_counter()
            super().__init__(*args, **kwargs)
            timings["session"] = timings.get("session", 0.0) + time.perf_counter() - t0

    pipeline.Embedder = TimedEmbedder
    pipeline.summarise = timed("pass", pipeline.summarise)
    pipeline.calibrate = timed("calibrate", pipeline.calibrate)
    pipeline.score_dist = timed("score_dist", pipeline.score_dist)


def worker_gate(spec: dict) -> dict:
    """score_dist from data on disk, timed from the call to its return (fingerprint loaded beforehand)."""
    t_import = time.perf_counter()
    from resque_airflow.core import Fingerprint
    from resque_airflow.runtime import pipeline

    fp = Fingerprint.load(spec["fingerprint"])
    t_import = time.perf_counter() - t_import
    timings: dict[str, float] = {}
    if spec.get("statistics") is False:
        _without_statistics(pipeline)
    _instrument(pipeline, timings)
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = pipeline.score_dist(
        spec["model"], fp, spec["data"], provider=spec["provider"], batch_size=spec["batch_size"]
    )
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_ms_per_image": 1000 * cpu / result.n_samples,
        "statistics": spec.get("statistics", True),
        "calibrate_seconds": timings.get("calibrate", 0.0),
        "session_seconds": timings["session"],
        "pass_seconds": result.seconds,
        "scoring_seconds": seconds - timings["pass"] - timings["session"],
        "n": result.n_samples,
        "images_per_s": result.n_samples / seconds,
        "pass_images_per_s": result.n_samples / result.seconds,
        "dist": result.score,
        "provider": result.provider,
        "import_seconds": t_import,
        # Heavy modules this gate loaded: a warm exposed-model cache spares it onnx, numpy k-means scikit-learn.
        "modules_loaded": sorted(m for m in ("onnx", "sklearn", "scipy", "pandas", "mlflow") if m in sys.modules),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_ort(spec: dict) -> dict:
    """Bare ONNX Runtime on in-memory batches of the unmodified model; session built and warmed up beforehand."""
    import onnxruntime as ort

    x, _ = load_npz_folder(Path(spec["data"]))
    bs = spec["batch_size"]
    providers = ["CPUExecutionProvider"]
    if spec["provider"] == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
        with contextlib.redirect_stdout(sys.stderr):
            ort.preload_dlls(msvc=False)  # as the gate's session does: CUDA/cuDNN from the nvidia-* wheels
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads(spec)
    sess = ort.InferenceSession(spec["model"], opts, providers=providers)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:bs]})  # warm-up: first-run allocations and kernel selection are not throughput
    rates, cpus = [], []
    for _ in range(spec["repeats"]):
        c0, t0 = cpu_seconds(), time.perf_counter()
        for i in range(0, x.shape[0], bs):
            sess.run(None, {name: x[i : i + bs]})
        rates.append(x.shape[0] / (time.perf_counter() - t0))
        cpus.append(cpu_seconds() - c0)
    return _rates(rates, cpus, x.shape[0]) | {
        "provider": sess.get_providers()[0],
        "threads": _threads(spec),
        "peak_rss_mb": peak_rss_mb(),
    }


def _torch_model(spec: dict):
    import torch

    sys.path.insert(0, str(HERE))
    from models import MODELS

    build, layer = MODELS[spec["model_name"]]
    model = build()
    model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    device = "cuda" if spec["provider"] == "cuda" else "cpu"
    return model.eval().to(device), dict(model.named_modules())[layer], device


def _pool(out):
    """Global average pooling by rank, as the gate pools in-graph: (N, C, H, W) -> mean over H, W; (N, T, D) -> T."""
    return out.mean((2, 3)) if out.ndim == 4 else out.mean(1) if out.ndim == 3 else out


def worker_torch(spec: dict) -> dict:
    """torch eager, batched, forward hook on the layer (pooled), float64 class sums by a one-hot matrix product."""
    import torch

    from resque_airflow.core import ClassSums

    torch.set_num_threads(_threads(spec))
    torch.set_num_interop_threads(1)
    model, module, device = _torch_model(spec)
    x, y = load_npz_folder(Path(spec["data"]))
    bs = spec["batch_size"]
    seen: list = []
    module.register_forward_hook(lambda _m, _i, out: seen.append(_pool(out)))
    rates, cpus, sums = [], [], None

    def one_pass() -> ClassSums:
        cs = ClassSums(NUM_CLASSES, spec["dim"])
        for i in range(0, x.shape[0], bs):
            seen.clear()
            model(torch.from_numpy(x[i : i + bs]).to(device))
            cs.update(seen[-1].float().cpu().numpy(), y[i : i + bs])
        return cs

    with torch.inference_mode():
        model(torch.from_numpy(x[:bs]).to(device))  # warm-up
        for _ in range(spec["repeats"]):
            if device == "cuda":
                torch.cuda.synchronize()
            c0, t0 = cpu_seconds(), time.perf_counter()
            sums = one_pass()
            rates.append(x.shape[0] / (time.perf_counter() - t0))
            cpus.append(cpu_seconds() - c0)
    return _rates(rates, cpus, x.shape[0]) | {
        "threads": torch.get_num_threads(),
        "dist": _sums_to_dist(spec["fingerprint"], sums.sums, sums.counts),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_reference(spec: dict) -> dict:
    """The published procedure: per class, that class's samples one at a time through the hooked model (batch 1)."""
    import torch

    torch.set_num_threads(_threads(spec))
    torch.set_num_interop_threads(1)
    model, module, device = _torch_model(spec)
    x, y = load_npz_folder(Path(spec["data"]))
    if spec.get("limit"):  # the thread sweep runs on a prefix of the data
        x, y = x[: spec["limit"]], y[: spec["limit"]]
    feats: list = []
    module.register_forward_hook(lambda _m, _i, out: feats.append(out))
    sums = np.zeros((NUM_CLASSES, spec["dim"]), np.float64)
    counts = np.zeros(NUM_CLASSES, np.int64)
    with torch.no_grad():
        model(torch.from_numpy(x[:1]).to(device))  # warm-up
        feats.clear()
        if device == "cuda":
            torch.cuda.synchronize()
        c0, t0 = cpu_seconds(), time.perf_counter()
        for k in range(NUM_CLASSES):  # one pass per class over the data
            acc = torch.zeros(spec["dim"], dtype=torch.float64, device=device)
            for i in np.flatnonzero(y == k):
                model(torch.from_numpy(x[i : i + 1]).to(device))
                acc += _pool(feats.pop())[0].double()
                counts[k] += 1
            sums[k] = acc.cpu().numpy()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "images_per_s": x.shape[0] / seconds,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_ms_per_image": 1000 * cpu / x.shape[0],
        "n": int(x.shape[0]),
        "threads": torch.get_num_threads(),
        "dist": _sums_to_dist(spec["fingerprint"], sums, counts),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_airflow(spec: dict) -> dict:
    """Run the ``resque_gate`` DAG with ``dag.test`` and time the gate task, split into start-up and scoring.

    The split comes from timers wrapped around the operator's ``execute`` and the pipeline's stages (session creation,
    the streaming pass, scoring): wrapping changes no behaviour. Everything outside the pass and the scoring (imports
    inside the task, registry resolve and download, opening and closing the gate run, session creation) is start-up.
    """
    t_start = time.perf_counter()
    import importlib.util

    from resque_airflow.operators.gate import ResqueGateOperator
    from resque_airflow.runtime import pipeline

    timings: dict[str, float] = {}
    _instrument(pipeline, timings)
    execute = ResqueGateOperator.execute

    def timed_execute(self, context):
        t0 = time.perf_counter()
        try:
            return execute(self, context)
        finally:
            timings["task"] = time.perf_counter() - t0

    ResqueGateOperator.execute = timed_execute
    module_spec = importlib.util.spec_from_file_location("resque_gate_dag", REPO / "dags" / "resque_gate.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    t_parsed = time.perf_counter()
    run = module.dag.test(
        run_conf={
            "model_name": spec["model_name"],
            "data_uri": spec["data"],
            "reuse_threshold": 0.99,  # take the cheap `reuse` branch: only the gate is measured
            "rebuild_threshold": 1.0,
        }
    )
    t_done = time.perf_counter()
    state = str(getattr(run, "state", ""))
    task = timings.get("task", float("nan"))
    scoring = timings.get("score_dist", float("nan")) - timings.get("session", 0.0)
    return {
        "dag_state": state,
        "n": spec["n"],
        "process_imports_s": t_parsed - t_start,
        "dag_test_s": t_done - t_parsed,
        "gate_task_s": task,
        "gate_startup_s": task - scoring,
        "gate_scoring_s": scoring,
        "gate_session_s": timings.get("session"),
        "gate_pass_s": timings.get("pass"),
        "gate_signals_s": scoring - timings.get("pass", float("nan")),
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {
    "gate": worker_gate,
    "ort": worker_ort,
    "torch": worker_torch,
    "reference": worker_reference,
    "airflow": worker_airflow,
}
