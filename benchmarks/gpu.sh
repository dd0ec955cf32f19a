#!/usr/bin/env bash
# The throughput benchmark on a CUDA machine: writes docs/performance/gpu.json (see docs/PERFORMANCE.md).
#
# Needs an NVIDIA GPU with its driver, Python >= 3.10 and network access to PyPI. Usage, from anywhere:
#
#     bash benchmarks/gpu.sh                       # N=20000 images per model, batch 512
#     N=50000 BATCH=1024 bash benchmarks/gpu.sh    # other sizes; extra arguments go to throughput.py
#
# The data set is larger than on CPU (4,000) because a GPU runs a CIFAR ResNet-18 at thousands of images per
# second: with 4,000 images the fixed costs (session creation, cuDNN's algorithm search, the scoring) would be
# most of the gate's time and the ratios would measure start-up, not throughput.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
N=${N:-20000}
BATCH=${BATCH:-512}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || { echo "gpu.sh: nvidia-smi failed: no NVIDIA GPU or driver here" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# One combined install resolves best. torch==2.13.0 from PyPI is its CUDA build on Linux: that is wanted here, and it
# brings the nvidia-* CUDA/cuDNN wheels that onnxruntime-gpu loads (resque_airflow.runtime.session preloads them).
"$PY" -m pip install --quiet -e '.[torch]' 'torch==2.13.0'

# Fail early, and say why, if either framework cannot use the GPU.
"$PY" - <<'EOF'
import sys

import torch

from resque_airflow.runtime.session import create_session

if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device (CPU build of torch installed?)")
import onnx
from onnx import TensorProto, helper

graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
model.ir_version = 10
sess = create_session(model.SerializeToString(), "cuda")  # raises if ONNX Runtime cannot use CUDA
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; ONNX Runtime providers {sess.session.get_providers()}")
EOF

mkdir -p docs/performance
"$PY" benchmarks/throughput.py --provider cuda --n "$N" --batch-size "$BATCH" --json \
  --out docs/performance/gpu.json "$@" > /dev/null
echo "gpu.sh: wrote docs/performance/gpu.json"
"$PY" - <<'EOF'
import json

r = json.load(open("docs/performance/gpu.json"))
for k in ("gate_vs_ort", "gate_vs_torch", "gate_vs_reference", "rss_ratio_10x", "max_dist_diff"):
    print(f"{k:20s} {r.get(k)}")
print("met:", r["met"])
EOF
