"""The environment record stored with every benchmark result."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from rtrl_moe.benchmarks.config import dtype_name


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> float | None:
    """Return the 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cpu_warning(meta: dict) -> str | None:
    """Return a warning when other processes likely occupy the cores the run needs.

    With more runnable processes than idle cores, torch's worker threads wait
    for each other at every parallel operation, and step times can grow by
    orders of magnitude.
    """
    load, cores = meta.get("load_average_1min"), meta.get("cpu_count")
    if load is None or not cores:
        return None
    idle = cores - load
    if idle + 0.5 >= meta["threads"]:
        return None
    return (f"the 1-minute load average is {load:.1f} on {cores} cores, so fewer than "
            f"--threads={meta['threads']} cores are idle; timings will be slower and noisier "
            "than on an idle machine")


def git_commit() -> str | None:
    """Return the commit of the repository that contains this package, with "+dirty" if modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if status else commit


def collect_meta(device: torch.device, dtype: torch.dtype, argv: list[str] | None = None) -> dict:
    """Return device, processor, torch version, threads, dtype, date and command line.

    ``threads`` is ``torch.get_num_threads()`` at call time, so call this after
    ``torch.set_num_threads``. ``argv`` is the argument list without the
    program name; None uses ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if argv is None else argv
    meta = {
        "device": device.type,
        "cpu_model": cpu_model(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name(dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "rtrl_moe.benchmarks", *argv]),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
    }
    meta["processor"] = meta["gpu_name"] or meta["cpu_model"]
    return meta
