"""ONNX Runtime sessions with a deliberate provider choice.

``onnxruntime-gpu`` lists the CUDA provider even where CUDA libraries are missing; creating a session then prints a
long native error and silently falls back to CPU. We decide the provider list ourselves, keep native logging quiet
while probing, and say in one log line what was asked and what was obtained.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from resque_airflow.errors import ModelError, ResqueInputError, check_choice, first_line

if TYPE_CHECKING:
    import onnxruntime  # imported at run time only when a session is created

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
_ORT_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass
class Session:
    """An ONNX Runtime session and the provider it really runs on (``"cuda"`` or ``"cpu"``)."""

    session: object  # onnxruntime.InferenceSession
    provider: str

    @property
    def input(self) -> onnxruntime.NodeArg:
        """The model's (first) input: ``name``, ``shape`` (ints and symbolic names) and ``type``."""
        return self.session.get_inputs()[0]


@cache
def cuda_device_present() -> bool:
    """True when an NVIDIA device node or driver tool is visible (a cheap check before asking ORT for CUDA)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def _physical_cores() -> int | None:
    """Physical cores of the machine from ``/proc/cpuinfo`` (distinct (physical id, core id) pairs), else None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def _cgroup_cpu_limit() -> float | None:
    """CPUs granted by a cgroup CPU quota (``cpu.max`` v2 or ``cfs_quota_us`` v1), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


@cache
def intra_op_threads() -> int | None:
    """The intra-op thread count to ask ONNX Runtime for, or None to keep its default.

    ONNX Runtime's default is one thread per physical core of the machine, with the threads pinned to cores. That is
    the fastest setting on a machine of our own (measured in docs/PERFORMANCE.md), but it ignores the CPU affinity
    mask and a container's CPU quota: a Celery worker limited to 2 CPUs on a 64-core host would start 64 threads and
    thrash. So the default is kept unless the process may use fewer CPUs than the machine has physical cores; then
    the thread count is that limit (physical cores within the affinity mask, capped by the cgroup quota).
    """
    physical = _physical_cores()
    logical = os.cpu_count()
    if not physical or not logical:
        return None
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    smt = max(1, logical // physical)  # hardware threads per core
    limit = math.ceil(allowed / smt)
    quota = _cgroup_cpu_limit()
    if quota is not None:
        limit = min(limit, max(1, math.ceil(quota)))
    return limit if limit < physical else None


@cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip wheels (``nvidia-*``, e.g. from a CUDA build of torch) installed.

    Without this, ``onnxruntime-gpu`` finds them only on the system library path or after ``import torch``, so an
    Airflow task (no torch) silently fell back to CPU on machines whose CUDA comes from pip. Best effort and quiet:
    ``preload_dlls`` prints its failures, which are expected where CUDA is absent and handled by the caller.
    """
    import contextlib
    import io

    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload(cuda=True, cudnn=True, msvc=False)
    except Exception as exc:
        log.debug("onnxruntime.preload_dlls failed: %s", exc)
    if out.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", out.getvalue().strip())


def _session_options(threads: int | None, quiet: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or intra_op_threads()
    if threads:
        opts.intra_op_num_threads = int(threads)
    if quiet:
        opts.log_severity_level = 4  # fatal only: the CUDA probe's failure is expected and handled here
    return opts


def create_session(model: bytes | str, provider: str = "auto", *, threads: int | None = None) -> Session:
    """Create an inference session for serialized ONNX ``model`` bytes, or the model file at path ``model``.

    Args:
        provider: ``"auto"`` (CUDA if it really works, else CPU), ``"cuda"`` (fail if CUDA does not work) or
            ``"cpu"``.
        threads: intra-op threads; None: one per physical core available to this process (see
            :func:`intra_op_threads`).

    Raises:
        ResqueInputError: unknown provider, or ``"cuda"`` requested where CUDA does not work.
        ModelError: ONNX Runtime cannot load the model.
    """
    import onnxruntime as ort

    check_choice("provider", provider, PROVIDERS)
    want_cuda = provider == "cuda" or (
        provider == "auto" and cuda_device_present() and "CUDAExecutionProvider" in ort.get_available_providers()
    )
    if want_cuda:
        _preload_cuda_libraries()
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
            return Session(sess, "cuda")
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
        raise ModelError(f"model: ONNX Runtime cannot load it: {first_line(exc)}") from exc
    log.info("ONNX Runtime provider: asked %s, obtained cpu", provider)
    return Session(sess, "cpu")
