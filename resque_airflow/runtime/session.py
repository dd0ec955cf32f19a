"""ONNX Runtime sessions with a deliberate provider choice.

``onnxruntime-gpu`` lists the CUDA provider even where CUDA libraries are missing; creating a session then prints a
long native error and silently falls back to CPU. We decide the provider list ourselves, keep native logging quiet
while probing, and say in one log line what was asked and what was obtained.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from functools import cache

from resque_airflow.core.errors import ModelError, ResqueInputError

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_ORT_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass
class Session:
    """An ONNX Runtime session and the provider it really runs on (``"cuda"`` or ``"cpu"``)."""

    session: object  # onnxruntime.InferenceSession
    provider: str
    requested: str

    @property
    def input(self):
        return self.session.get_inputs()[0]


@cache
def cuda_device_present() -> bool:
    """True when an NVIDIA device node or driver tool is visible (a cheap check before asking ORT for CUDA)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def _session_options(threads: int | None, quiet: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if quiet:
        opts.log_severity_level = 4  # fatal only: the CUDA probe's failure is expected and handled here
    return opts


def create_session(model: bytes, provider: str = "auto", *, threads: int | None = None) -> Session:
    """Create an inference session for serialized ONNX ``model`` bytes.

    Args:
        provider: ``"auto"`` (CUDA if it really works, else CPU), ``"cuda"`` (fail if CUDA does not work) or
            ``"cpu"``.
        threads: intra-op threads; None lets ONNX Runtime use one per physical core.

    Raises:
        ResqueInputError: unknown provider, or ``"cuda"`` requested where CUDA does not work.
        ModelError: ONNX Runtime cannot load the model.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ResqueInputError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    want_cuda = provider == "cuda" or (
        provider == "auto" and cuda_device_present() and "CUDAExecutionProvider" in ort.get_available_providers()
    )
    if want_cuda:
        ort.set_default_logger_severity(4)
        try:
            sess = ort.InferenceSession(
                model,
                sess_options=_session_options(threads, quiet=True),
                providers=[_ORT_NAMES["cuda"], _ORT_NAMES["cpu"]],
            )
        except Exception as exc:
            raise ModelError(f"model: ONNX Runtime cannot load it: {exc}") from exc
        finally:
            ort.set_default_logger_severity(2)
        if sess.get_providers()[0] == _ORT_NAMES["cuda"]:
            log.info("ONNX Runtime provider: asked %s, obtained cuda", provider)
            return Session(sess, "cuda", provider)
        if provider == "cuda":
            raise ResqueInputError(
                "provider='cuda' was asked but CUDA does not work here (no device, or CUDA/cuDNN libraries missing); "
                "use provider='auto' or 'cpu'"
            )
    try:
        sess = ort.InferenceSession(
            model, sess_options=_session_options(threads, quiet=False), providers=[_ORT_NAMES["cpu"]]
        )
    except Exception as exc:
        raise ModelError(f"model: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from exc
    log.info("ONNX Runtime provider: asked %s, obtained cpu", provider)
    return Session(sess, "cpu", provider)
