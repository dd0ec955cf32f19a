"""Facts about the machine and this process that the benchmarks report: cores, RAM, load, resident memory."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def physical_cores() -> int:
    """Physical cores of this machine (ONNX Runtime's default intra-op thread count)."""
    try:
        pairs = set()
        block: dict[str, str] = {}
        for line in [*Path("/proc/cpuinfo").read_text().splitlines(), ""]:
            if not line.strip():
                if "core id" in block:
                    pairs.add((block.get("physical id", "0"), block["core id"]))
                block = {}
                continue
            key, _, value = line.partition(":")
            block[key.strip()] = value.strip()
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, core counts, RAM, load average and library versions."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    versions = {}
    for mod in ("numpy", "onnxruntime", "onnx", "torch"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where ``/proc/loadavg`` is missing."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_ticks() -> dict[str, float] | None:
    """Machine-wide CPU seconds since boot from ``/proc/stat`` (``busy``: user + system + irq; ``idle``; ``steal``:
    time the hypervisor gave this VM's vCPUs to others), or None where it is missing. Differences between two calls
    say how busy the machine was, and how much of it was taken away, while a path ran."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    v = [int(f) / tick for f in fields] + [0.0] * 8
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4], "steal": v[7]}


def cpu_share(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """Between two :func:`cpu_ticks`: the machine's busy, idle and stolen fractions of its vCPU time."""
    if not before or not after:
        return None
    d = {k: after[k] - before[k] for k in before}
    total = sum(d.values()) or 1.0
    return {f"{k}_fraction": d[k] / total for k in d}


def peak_rss_mb() -> float | None:
    """This process's peak resident set size (``VmHWM``) in MiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident set size of this process now (not the peak), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
