"""The memory suite: peak memory of BPTT and lazy RTRL against the sequence length.

Each (method, length) point runs in its own Python process
(:mod:`rtrl_moe.benchmarks.memory_point`), with a cross-entropy loss at every
step, so that BPTT keeps the graph of the whole sequence until its single
backward pass. The compared quantity is the peak above the baseline of the
same process: RSS on CPU, allocated CUDA memory on GPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

import rtrl_moe
from rtrl_moe.benchmarks.config import (FULL_SWEEPS, THESIS2, ModelConfig, count_parameters,
                                        dtype_name, resolve_device, resolve_dtype,
                                        validate_counts, validate_methods)
from rtrl_moe.benchmarks.targets import memory_flatness

logger = logging.getLogger(__name__)

MEMORY_METHODS = ("bptt", "rtrl-lazy")


def point_command(method: str, length: int, config: ModelConfig, *, batch_size: int,
                  device: torch.device, dtype: torch.dtype, threads: int, seed: int,
                  max_seconds: float | None) -> list[str]:
    """Return the command line that measures one point in a new Python process."""
    return [sys.executable, "-m", "rtrl_moe.benchmarks.memory_point",
            "--method", method, "--length", str(length), "--config", json.dumps(config.as_dict()),
            "--batch-size", str(batch_size), "--device", device.type,
            "--dtype", dtype_name(dtype), "--threads", str(threads), "--seed", str(seed),
            "--max-seconds", str(max_seconds or 0)]


def _child_environment() -> dict[str, str]:
    """Return the environment for a point process, with this copy of rtrl_moe importable."""
    environment = dict(os.environ)
    root = str(Path(rtrl_moe.__file__).resolve().parent.parent)
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = root if not existing else os.pathsep.join([root, existing])
    return environment


def run_point(command: list[str], method: str, length: int) -> dict:
    """Run one point process and return its JSON record, or a "failed" record."""
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env=_child_environment())
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if completed.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    stderr_lines = completed.stderr.strip().splitlines()
    tail = stderr_lines[-1] if stderr_lines else "no output on stderr"
    logger.error("memory point %s at T=%d failed with exit status %d: %s", method, length,
                 completed.returncode, tail)
    return {"method": method, "length": length, "status": "failed",
            "reason": f"exit status {completed.returncode}: {tail}"}


def peak_above_baseline(record: dict) -> int | None:
    """Return a point's peak memory above its baseline in bytes (CUDA memory when present)."""
    if record.get("status") != "ok":
        return None
    if "cuda_peak_above_baseline_bytes" in record:
        return record["cuda_peak_above_baseline_bytes"]
    return 1024 * record["peak_rss_above_baseline_kib"]


def crossover_length(bptt: dict[int, int], lazy: dict[int, int]) -> int | None:
    """Return the first length at which BPTT's peak exceeds rtrl-lazy's, or None."""
    for length in sorted(set(bptt) & set(lazy)):
        if bptt[length] > lazy[length]:
            return length
    return None


def run_memory(config: ModelConfig = THESIS2, *, lengths: tuple[int, ...] = FULL_SWEEPS.lengths,
               methods: tuple[str, ...] = MEMORY_METHODS, batch_size: int = 1,
               device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               threads: int | None = None, seed: int = 0,
               max_seconds: float | None = None) -> dict:
    """Measure the peak memory of each method at each sequence length.

    Parameters
    ----------
    config : ModelConfig
        Model size; the default is the thesis-2 configuration.
    lengths : tuple of int
        Sequence lengths T.
    methods : tuple of str
        Methods to measure; the crossover and the flatness target need
        ``"bptt"`` and ``"rtrl-lazy"``.
    batch_size, device, dtype, seed
        As in :func:`~rtrl_moe.benchmarks.timing.run_speed`.
    threads : int or None
        torch threads in each point process; None uses this process's count.
    max_seconds : float or None
        A point whose projected run time exceeds this many seconds stops early
        and is recorded as skipped; None or 0 means no limit.

    Returns
    -------
    dict
        ``points`` (one record per method and length), ``comparison`` (per
        length: both peaks and the sensitivity size), ``crossover_length``
        (None when BPTT never exceeds rtrl-lazy in range) and ``targets``.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    validate_counts(batch_size=batch_size)
    validate_methods(methods)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be integers >= 1, got {list(lengths)}")
    threads = torch.get_num_threads() if threads is None else threads

    points = []
    for method in methods:
        for length in lengths:
            logger.info("memory: %s at T=%d in a new process", method, length)
            command = point_command(method, length, config, batch_size=batch_size,
                                    device=device, dtype=dtype, threads=threads, seed=seed,
                                    max_seconds=max_seconds)
            record = run_point(command, method, length)
            if record.get("status") == "skipped":
                logger.warning("memory point %s at T=%d skipped: %s", method, length,
                               record["reason"])
            points.append(record)
    return _memory_summary(points, config, batch_size, dtype, device, lengths, max_seconds)


def _memory_summary(points: list[dict], config: ModelConfig, batch_size: int,
                    dtype: torch.dtype, device: torch.device, lengths: tuple[int, ...],
                    max_seconds: float | None) -> dict:
    peaks: dict[str, dict[int, int]] = {}
    for record in points:
        peak = peak_above_baseline(record)
        if peak is not None:
            peaks.setdefault(record["method"], {})[record["length"]] = peak

    itemsize = torch.empty((), dtype=dtype).element_size()
    n_params = count_parameters(config)
    sensitivity = batch_size * config.state_size * n_params * itemsize
    bptt, lazy = peaks.get("bptt", {}), peaks.get("rtrl-lazy", {})
    comparison = [{"length": t, "bptt_peak_bytes": bptt.get(t), "lazy_peak_bytes": lazy.get(t),
                   "sensitivity_bytes": sensitivity} for t in lengths]
    return {
        "config": config.as_dict(), "batch_size": batch_size, "n_params": n_params,
        "memory_kind": "cuda allocated" if device.type == "cuda" else "cpu max rss",
        "max_point_seconds": max_seconds, "points": points, "comparison": comparison,
        "sensitivity_bytes": sensitivity, "crossover_length": crossover_length(bptt, lazy),
        "targets": [memory_flatness(lazy, bptt)],
    }
