"""A gate's fixed costs, stage by stage, and the MLflow round trips of a real ``run_gate``.

Usage::

    python benchmarks/fixed_costs.py [--models resnet18,vit] [--n 2000] [--out docs/performance/fixed_costs.json]

Per model, in a fresh process each (so imports are cold), once with an empty exposed-model cache and once with it
holding the model's edit: the imports of the scoring path, reading and hashing the model, the graph surgery
(:func:`expose_layer`, cold only), ONNX Runtime session creation, the streaming pass (:func:`summarise`),
RESQUE_dist with the companion signals (:func:`score_summary`) and the calibrated statistics
(:func:`resque_airflow.core.calibration.calibrate` on the pass's summary), and which heavy modules were loaded.
Wall and CPU time of each, with the load average before and after. Then a real :func:`run_gate` against a SQLite
MLflow registry (model published first), with every public :class:`mlflow.MlflowClient` method wrapped to count its
calls and their time.

Measures only; it changes nothing in the product.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from machine import loadavg, machine_info, peak_rss_mb, rss_mib  # noqa: E402
from throughput_workers import cpu_seconds  # noqa: E402


class Stages:
    """Wall and CPU seconds of named stages, with the 1-minute load average at each stage's start and the resident
    memory (now and peak, MiB) at its end: where a gate's peak memory comes from."""

    def __init__(self) -> None:
        self.out: dict[str, dict] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        load, c0, t0 = loadavg(), cpu_seconds(), time.perf_counter()
        value = fn(*args, **kwargs)
        self.out[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "load": load,
                          "rss_mib_after": rss_mib(), "peak_rss_mib_after": peak_rss_mb()}  # fmt: skip
        return value


def stages_worker(spec: dict) -> dict:
    """Every stage of ``score_dist`` run by hand, in order, each timed (a fresh process: imports are cold).

    ``spec["cache"]``: ``"cold"`` (the exposed-model cache is empty: the graph edit's own stages are timed first,
    then the product's ``Embedder`` does them again and writes the cache) or ``"warm"`` (the cache holds this
    model's edit: the ``Embedder`` is a cache lookup and a session created from the cached file).
    """
    st = Stages()

    def imports():
        import onnxruntime  # noqa: F401

        from resque_airflow.runtime import pipeline  # noqa: F401

    st("import_pipeline", imports)
    from resque_airflow.core import Fingerprint
    from resque_airflow.core.calibration import calibrate
    from resque_airflow.runtime import pipeline
    from resque_airflow.runtime.model_file import read_model
    from resque_airflow.runtime.session import create_session

    fp = st("load_fingerprint", Fingerprint.load, spec["fingerprint"])
    model_bytes, sha = st("read_and_hash_model", read_model, spec["model"])
    if spec["cache"] == "cold":

        def import_onnx():
            from resque_airflow.runtime import graph  # noqa: F401

        st("import_onnx", import_onnx)
        from resque_airflow.runtime.graph import expose_layer, load_model

        exposed = st("graph_surgery", lambda b=model_bytes: expose_layer(load_model(b), fp.layer, fp.pooling))
        serialised = st("serialise_graph", exposed.model.SerializeToString)
        del exposed
        st("create_session", create_session, serialised, "cpu")
        del serialised
    # The product's Embedder: on a cold cache the edit and the session again (and the cache write), so that the
    # stages above are its breakdown; on a warm one the cache lookup and a session from the cached file.
    embedder = st(
        "embedder_total", pipeline.Embedder, model_bytes, layer=fp.layer, pooling=fp.pooling, provider="cpu",
        model_sha256=sha,
    )  # fmt: skip
    del model_bytes
    summary, stats = st("pass", pipeline.summarise, embedder, fp, spec["data"], batch_size=spec["batch_size"])
    del embedder
    st("score_summary (dist + companions)", pipeline.score_summary, fp, summary)
    st("calibrate (interval, null, ATC)", calibrate, fp.summary, summary, label_source="given")
    loaded = sorted(m for m in ("onnx", "sklearn", "scipy", "pandas", "mlflow") if m in sys.modules)
    return {"n": stats.n_samples, "cache": spec["cache"], "stages": st.out, "modules_loaded": loaded,
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def mlflow_worker(spec: dict) -> dict:
    """A real ``run_gate`` against the SQLite registry, every public MlflowClient method counted and timed."""
    t0 = time.perf_counter()
    import mlflow

    calls: dict[str, dict] = {}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                c = calls.setdefault(name, {"calls": 0, "seconds": 0.0})
                c["calls"] += 1
                c["seconds"] += time.perf_counter() - t

        return wrapper

    for name in dir(mlflow.MlflowClient):
        fn = getattr(mlflow.MlflowClient, name)
        if not name.startswith("_") and callable(fn):
            setattr(mlflow.MlflowClient, name, wrap(name, fn))
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, run_gate

    imports_s = time.perf_counter() - t0
    load, c0, t1 = loadavg(), cpu_seconds(), time.perf_counter()
    client = make_client(spec["tracking_uri"])
    outcome = run_gate(GateRequest(f"models:/{spec['name']}@champion", spec["data"], provider="cpu"), client=client)
    wall, cpu = time.perf_counter() - t1, cpu_seconds() - c0
    return {
        "imports_s": imports_s,
        "run_gate_wall_s": wall,
        "run_gate_cpu_s": cpu,
        "load_before": load,
        "load_after": loadavg(),
        "decision": outcome.decision,
        "n": outcome.n_samples,
        "client_calls": sum(c["calls"] for c in calls.values()),
        "client_seconds": sum(c["seconds"] for c in calls.values()),
        "by_method": dict(sorted(calls.items(), key=lambda kv: -kv[1]["calls"])),
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {"stages": stages_worker, "mlflow": mlflow_worker}


def _run(kind: str, spec: dict, cache_dir: Path) -> dict:
    """One worker in a fresh process, with ``cache_dir`` as its exposed-model cache."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=3600,
        env=os.environ | {"RESQUE_CACHE_DIR": str(cache_dir)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,vit")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))), flush=True)
        return 0
    from throughput import fingerprint, prepare_model
    from workloads import IMAGE_SPEC, write_npz_shards, write_png_folder

    from resque_airflow.core import ImageSpec
    from resque_airflow.registry.publish import publish_model
    from resque_airflow.runtime.pipeline import DEFAULT_BATCH_SIZE

    report: dict = {"benchmark": "fixed_costs", "machine": machine_info(), "load_before": loadavg(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="resque-fixed-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            print(f"[{name}] load {loadavg()}", file=sys.stderr, flush=True)
            model = prepare_model(name, work)
            d = work / name
            write_png_folder(d / "ref-png", 1000, seed=1, shift=0.0)
            write_npz_shards(d / "ref-npz", 1000, seed=1, shift=0.0)
            write_npz_shards(d / "new-npz", args.n, seed=2, shift=0.5)
            fp_dir, _ = fingerprint(model, d / "ref-png", d / "fingerprint", "cpu")
            spec = {"model": model["onnx"], "fingerprint": fp_dir, "data": str(d / "new-npz"),
                    "batch_size": DEFAULT_BATCH_SIZE}  # fmt: skip
            cache = d / "cache"
            stages = {state: _run("stages", spec | {"cache": state}, cache) for state in ("cold", "warm")}
            uri = f"sqlite:///{(d / 'mlflow.db').resolve()}"
            publish_model(
                tracking_uri=uri,
                name=f"bench-{name}",
                model_path=model["onnx"],
                reference=str(d / "ref-npz"),
                provider="cpu",
                image_spec=ImageSpec(**IMAGE_SPEC),
            )
            # The gate's cache already holds this model's edit (the warm stages above): the steady state of a
            # scheduled gate.
            gate = _run("mlflow", {"tracking_uri": uri, "name": f"bench-{name}", "data": str(d / "new-npz")}, cache)
            report["models"][name] = {"stages": stages, "run_gate": gate}
    report["load_after"] = loadavg()
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
