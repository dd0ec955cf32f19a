"""Shared fixtures: a small torch CNN exported to ONNX, and data written in the product's formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Airflow reads its configuration when first imported: point it at a throwaway home before any test imports it.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="resque-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite), as `airflow db migrate` leaves it."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    return _AIRFLOW_HOME


def mlflow_conn(tracking_uri: str) -> str:
    """The JSON form of an `mlflow` connection, as AIRFLOW_CONN_MLFLOW_DEFAULT takes it."""
    return json.dumps({"conn_type": "mlflow", "host": tracking_uri})


class _Net:
    """Factory for a tiny CNN (kept lazy: torch is imported only by tests that need it)."""

    @staticmethod
    def build(seed: int = 0):
        import torch

        torch.manual_seed(seed)

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
                self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
                self.fc = torch.nn.Linear(16, 4)

            def forward(self, x):
                x = torch.relu(self.conv1(x))
                x = torch.relu(self.conv2(x))
                return self.fc(x.mean((2, 3)))

        return Net().eval()


def make_cnn():
    """A tiny untrained 4-class CNN on (N, 1, 8, 8) inputs; ``conv2`` is its representation layer."""
    return _Net.build()


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory):
    """(torch model, path of its ONNX export with layer conv2)."""
    import torch

    from resque_airflow.runtime.export import export_torch

    model = make_cnn()
    path = tmp_path_factory.mktemp("model") / "cnn.onnx"
    export_torch(model, torch.randn(2, 1, 8, 8), path, layer="conv2")
    return model, path


def make_images(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random (1, 8, 8) float32 inputs whose class (0..3) sets a bright quadrant; ``shift`` adds noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.2
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 0.8
    if shift:
        x += rng.normal(0, shift, x.shape).astype(np.float32)
    return x, y.astype(np.int64)


@pytest.fixture
def write_npz(tmp_path):
    def write(name: str, x: np.ndarray, y: np.ndarray | None = None):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if y is None:
            np.savez(path, x=x)
        else:
            np.savez(path, x=x, y=y)
        return path

    return write


def flip_byte(path: str | Path, offset: int) -> None:
    """Tamper with a file (path or file: URI) in place: flip the low bit of the byte at ``offset``."""
    from urllib.parse import urlparse

    path = Path(urlparse(str(path)).path) if str(path).startswith("file:") else Path(path)
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))
