"""Shared fixtures: a small torch CNN exported to ONNX, and data written in the product's formats."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Tests never need CUDA; keep ONNX Runtime from probing for it.
os.environ.setdefault("RESQUE_TEST", "1")


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
