"""False-alarm rate of the calibrated gate on unshifted batches, by batch size, through the product's own path.

Usage::

    python benchmarks/calibration.py [--out docs/evidence] [--batches 150] [--quick]

Two real ONNX models (a small CNN exported by ``export_torch`` with its ``conv2`` layer, and an MLP whose
representation is its classifier's input) see quadrant images (``workloads.quadrant_images``: unlimited clean data,
so every batch is fresh and disjoint from the reference). Each model is fingerprinted on a reference of 20,000
images; then, for n = 100, 1,000 and 10,000, clean batches are scored by ``pipeline.score_dist`` and the share whose
p-value falls below alpha is the false-alarm rate (target: within [0, 2 alpha]). The table also gives the median
null quantile, which shows how far the fixed threshold of the first version (0.0123) was from each model's own
noise floor at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workloads import quadrant_images  # noqa: E402

ALPHAS = (0.01, 0.05)


def models(home: Path) -> dict[str, str]:
    """The two exported models: ``{name: ONNX path}``."""
    import torch
    from torch import nn

    from resque_airflow.runtime.export import export_torch

    torch.manual_seed(0)
    cnn = nn.Sequential()
    cnn.add_module("conv1", nn.Conv2d(1, 8, 3, padding=1))
    cnn.add_module("relu1", nn.ReLU())
    cnn.add_module("conv2", nn.Conv2d(8, 16, 3, padding=1))
    cnn.add_module("relu2", nn.ReLU())
    cnn.add_module("pool", nn.AdaptiveAvgPool2d(1))
    cnn.add_module("flat", nn.Flatten())
    cnn.add_module("fc", nn.Linear(16, 4))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    example = torch.randn(2, 1, 8, 8)
    return {
        "cnn": str(export_torch(cnn.eval(), example, home / "cnn.onnx", layer="conv2").path),
        "mlp": str(export_torch(mlp.eval(), example, home / "mlp.onnx").path),
    }


def run(out: Path, batches: int, sizes: tuple[int, ...], reference: int) -> dict:
    from resque_airflow.runtime import pipeline

    rows = []
    with tempfile.TemporaryDirectory(prefix="resque-calibration-") as tmp:
        home = Path(tmp)
        for name, path in models(home).items():
            x, y = quadrant_images(reference, seed=1)
            np.savez(home / "ref.npz", x=x, y=y)
            fp = pipeline.fingerprint_model(path, str(home / "ref.npz"))
            for n in sizes:
                t0 = time.perf_counter()
                p_values, quantiles, scores = [], [], []
                for b in range(batches):
                    x, y = quadrant_images(n, seed=10_000 + 1000 * n + b)
                    np.savez(home / "batch.npz", x=x, y=y)
                    result = pipeline.score_dist(path, fp, str(home / "batch.npz"))
                    p_values.append(result.calibration.detection.p_value)
                    quantiles.append(result.calibration.detection.quantile)
                    scores.append(result.score)
                row = {
                    "model": name, "n": n, "batches": batches, "reference": reference,
                    "median_score": float(np.median(scores)), "median_null_q99": float(np.median(quantiles)),
                    "seconds": time.perf_counter() - t0,
                } | {f"false_alarm_rate_{a}": float(np.mean(np.array(p_values) < a)) for a in ALPHAS}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows, "load_average": os.getloadavg(), "command": " ".join(sys.argv)}


def to_markdown(result: dict) -> str:
    lines = ["| model | n | batches | median RESQUE | median null p99 | FAR at 0.01 | FAR at 0.05 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['n']:,} | {r['batches']} | {r['median_score']:.4f} | {r['median_null_q99']:.4f} | "
            f"{r['false_alarm_rate_0.01']:.3f} | {r['false_alarm_rate_0.05']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs/evidence")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--quick", action="store_true", help="10 batches, n = 100 and 1,000 (smoke test)")
    args = p.parse_args(argv)
    sizes = (100, 1000) if args.quick else (100, 1000, 10_000)
    result = run(args.out, 10 if args.quick else args.batches, sizes, 5000 if args.quick else 20_000)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "calibration.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
