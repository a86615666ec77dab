"""Measure the peak memory of one engine over one sequence, in a fresh process.

Run as ``python -m rtrl_moe.benchmarks.memory_point --method M --length T ...``;
the result is printed as one JSON line on stdout. The memory suite starts one
such process per point so that no point inherits another's peak.

The baseline is taken after the imports, the model, the inputs and the engine
object exist, and before ``begin`` allocates any per-sequence state. On CPU the
peak is ``ru_maxrss`` (KiB on Linux), which never decreases, so ``peak - baseline``
is the growth of the process's maximum resident set during the sequence. On
CUDA the peak is ``torch.cuda.max_memory_allocated`` after a reset at the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

import torch

from rtrl_moe.benchmarks.config import (ALL_METHODS, ModelConfig, resolve_device, resolve_dtype,
                                        synchronize)
from rtrl_moe.benchmarks.timing import TimeGuard, sample_inputs, sample_targets
from rtrl_moe.gradients import make_engine
from rtrl_moe.layout import ParameterLayout
from rtrl_moe.seeding import set_seed


def max_rss_kib() -> int:
    """Return the maximum resident set size of this process so far (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_point(method: str, length: int, config: ModelConfig, *, batch_size: int = 1,
                  device: str = "cpu", dtype: str = "float32", threads: int = 2, seed: int = 0,
                  max_seconds: float | None = None) -> dict:
    """Run one sequence with a loss at every step and return its peak memory.

    Call this in a fresh process: ``ru_maxrss`` covers the whole process
    lifetime, so an earlier, larger allocation would hide this point's peak.
    """
    torch.set_num_threads(threads)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    set_seed(seed, deterministic=False)
    model = config.build(dtype, device)
    inputs = sample_inputs(config, batch_size, length, seed + 1, device, dtype)
    targets = sample_targets(config, batch_size, length, seed + 1, device)
    engine = make_engine(model, method)
    gc.collect()

    baseline_kib = max_rss_kib()
    cuda_baseline = None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device)

    guard = TimeGuard(max_seconds, length, "steps")
    start = time.perf_counter()
    engine.begin(batch_size)
    for t in range(length):
        step_start = time.perf_counter()
        engine.step(inputs[:, t], targets[:, t])
        reason = guard.reason(t + 1, time.perf_counter() - step_start)
        if reason:
            return {"method": method, "length": length, "status": "skipped", "reason": reason}
    engine.take_gradients()
    synchronize(device)
    seconds = time.perf_counter() - start

    record = {
        "method": method, "length": length, "batch_size": batch_size, "status": "ok",
        "seconds": seconds, "ms_per_step": 1e3 * seconds / length,
        "n_params": ParameterLayout(model).n_params, "state_size": config.state_size,
        "baseline_rss_kib": baseline_kib, "peak_rss_kib": max_rss_kib(),
    }
    record["peak_rss_above_baseline_kib"] = record["peak_rss_kib"] - baseline_kib
    if cuda_baseline is not None:
        peak = torch.cuda.max_memory_allocated(device)
        record.update(cuda_baseline_bytes=cuda_baseline, cuda_peak_bytes=peak,
                      cuda_peak_above_baseline_bytes=peak - cuda_baseline)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rtrl_moe.benchmarks.memory_point",
        description="Measure the peak memory of one engine over one sequence; prints JSON.")
    parser.add_argument("--method", required=True, choices=ALL_METHODS)
    parser.add_argument("--length", required=True, type=int, help="sequence length in steps")
    parser.add_argument("--config", required=True,
                        help="RecurrentMoE constructor arguments as a JSON object")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="stop and report 'skipped' when the projected run time exceeds "
                             "this many seconds (0: no limit)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, measure one point and print its record as JSON."""
    args = parse_args(argv)
    config = ModelConfig(**json.loads(args.config))
    record = measure_point(args.method, args.length, config, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, threads=args.threads,
                           seed=args.seed, max_seconds=args.max_seconds)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
