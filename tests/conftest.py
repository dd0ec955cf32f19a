"""Shared fixtures: a small torch CNN exported to ONNX, data written in the product's formats, a SQLite registry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Airflow reads its configuration when first imported: point it at a throwaway home before any test imports it.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="resque-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
# The exposed-model cache (runtime/exposed.py) of the whole run, out of the user's home; tests of the cache itself
# point RESQUE_CACHE_DIR at their own folder.
os.environ["RESQUE_CACHE_DIR"] = tempfile.mkdtemp(prefix="resque-cache-")


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


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks/<name>.py``, imported once by path.

    ``benchmarks/`` is a folder of scripts, not a package: each finds its siblings because Python puts the
    script's folder first on ``sys.path``. Loading by path gives the tests the same modules without putting that
    folder on ``sys.path`` for every test.
    """
    key = f"benchmarks.{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before exec: dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules[key]


# ``n`` random (1, 8, 8) float32 inputs whose class (0..3) lights one quadrant; ``shift`` adds noise. The same
# generator feeds benchmarks/soak.py.
make_images = load_benchmark("workloads").quadrant_images


@pytest.fixture(scope="session")
def cnn_registry(tmp_path_factory, cnn_onnx) -> Callable[..., tuple[str, Path]]:
    """Factory of SQLite registries holding the tiny CNN (:func:`cnn_onnx`), for module-scoped fixtures.

    ``cnn_registry(label, names, new=(n, seed, shift), gate=True, ref_name="ref.npz")`` makes a fresh folder,
    writes 300 reference images (seed 1) to ``ref_name``, publishes the CNN under each of ``names`` (``champion``
    alias), writes ``new`` images to ``new.npz`` when given, and gates ``models:/cnn@champion`` on them once when
    ``gate``. Returns ``(tracking URI, folder)``.
    """
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, run_gate
    from resque_airflow.registry.publish import publish_model

    def make(
        label: str,
        names: tuple[str, ...] = ("cnn",),
        *,
        new: tuple[int, int, float] | None = None,
        gate: bool = False,
        ref_name: str = "ref.npz",
    ) -> tuple[str, Path]:
        root = tmp_path_factory.mktemp(label)
        uri = f"sqlite:///{root}/mlflow.db"
        x, y = make_images(300, seed=1)
        np.savez(root / ref_name, x=x, y=y)
        for name in names:
            publish_model(tracking_uri=uri, name=name, model_path=cnn_onnx[1], reference=str(root / ref_name))
        if new is not None:
            n, seed, shift = new
            x, y = make_images(n, seed=seed, shift=shift)
            np.savez(root / "new.npz", x=x, y=y)
        if gate:
            run_gate(GateRequest("models:/cnn@champion", str(root / "new.npz")), client=make_client(uri))
        return uri, root

    return make


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


def load_dag(name: str):
    """The DAG object of ``dags/<name>.py``, imported by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "dags" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory):
    """The digits CNN trained for real once per session (15 epochs), exported with ``conv2``, its weights and
    reference split written: ``SimpleNamespace(splits, onnx_path, weights, reference, cost)``. Registries that
    publish it live in their own folders (publishing copies the files)."""
    from types import SimpleNamespace

    import torch

    from resque_airflow.examples import digits
    from resque_airflow.runtime.export import export_torch

    home = tmp_path_factory.mktemp("digits-cnn")
    s = digits.load_digits_splits(seed=0)
    model, cost = digits.train_model(digits.make_model(seed=0), s.train.x, s.train.y, epochs=15,
                                     heldout_x=s.heldout.x, heldout_y=s.heldout.y, measure_energy=False)  # fmt: skip
    onnx_path = export_torch(model, torch.from_numpy(s.train.x[:2]), home / "m.onnx", layer="conv2").path
    torch.save(model.state_dict(), home / "w.pt")
    ref = digits.write_npz(home / "ref.npz", s.reference.x, s.reference.y)
    return SimpleNamespace(splits=s, onnx_path=onnx_path, weights=home / "w.pt", reference=ref, cost=cost)
