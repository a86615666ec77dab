"""The floor suite: bare batched products of the recorded shapes against the engine step.

For each RTRL method, the speed measurement records the ``(batch, m, k, n)``
shapes of the products on the sensitivity matrix at every timed step. The
floor of a step is the time of ``torch.bmm`` on random data of exactly those
shapes, run alone with a preallocated output, so it excludes allocation,
indexing, Jacobian computation and everything else the step does. Efficiency
is the median floor per step over the median step time, so 1.0 means the step
costs no more than its products.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable, Sequence

import torch

from rtrl_moe.benchmarks.config import (RTRL_METHODS, THESIS2, ModelConfig, resolve_device,
                                        resolve_dtype, synchronize)
from rtrl_moe.benchmarks.targets import EFFICIENCY_TARGETS, at_least
from rtrl_moe.benchmarks.timing import run_speed

logger = logging.getLogger(__name__)

Shape = tuple[int, int, int, int]


def time_bmm(shape: Shape, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", warmup: int = 2, repeats: int = 10) -> float:
    """Return the median seconds of one ``torch.bmm`` of shape ``(batch, m, k, n)``.

    The operands are standard normal data of ``dtype`` on ``device``, and the
    output is preallocated and reused.
    """
    device = torch.device(device)
    batch, m, k, n = shape
    left = torch.randn(batch, m, k, dtype=dtype, device=device)
    right = torch.randn(batch, k, n, dtype=dtype, device=device)
    out = torch.empty(batch, m, n, dtype=dtype, device=device)
    for _ in range(warmup):
        torch.bmm(left, right, out=out)

    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.bmm(left, right, out=out)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def time_shapes(shapes: Iterable[Shape], *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", warmup: int = 2,
                repeats: int = 10) -> dict[Shape, float]:
    """Return the median ``torch.bmm`` seconds of each distinct shape in ``shapes``."""
    table = {}
    for shape in sorted({tuple(int(v) for v in s) for s in shapes}):
        if min(shape) < 1:
            raise ValueError(f"product shapes must be positive (batch, m, k, n), got {shape}")
        table[shape] = time_bmm(shape, dtype=dtype, device=device, warmup=warmup,
                                repeats=repeats)
    return table


def floor_per_step(steps: Sequence[Sequence[Shape]], table: dict[Shape, float]) -> list[float]:
    """Return the floor seconds of each step: the sum of its products' times in ``table``."""
    return [sum(table[tuple(shape)] for shape in step) for step in steps]


def floor_record(speed_record: dict, *, dtype: torch.dtype, device: torch.device,
                 warmup: int, repeats: int) -> dict:
    """Return FLOPs, floor, step time and efficiency for one method's speed record."""
    method = speed_record["method"]
    if speed_record.get("status") != "ok":
        return {"method": method, "status": "skipped",
                "reason": speed_record.get("reason", "no speed measurement")}

    steps = [[tuple(shape) for shape in step] for step in speed_record["matmuls"]]
    logger.info("timing the floor of %s (%d distinct product shapes)", method,
                len({shape for step in steps for shape in step}))
    table = time_shapes((shape for step in steps for shape in step), dtype=dtype,
                        device=device, warmup=warmup, repeats=repeats)
    floor_ms = 1e3 * statistics.median(floor_per_step(steps, table))
    step_ms = speed_record["step_ms"]
    flops = speed_record["flops_per_step"]
    return {
        "method": method, "status": "ok",
        "flops_per_step": flops,
        "floor_ms": floor_ms,
        "step_ms": step_ms,
        "efficiency": floor_ms / step_ms,
        "step_gflops_per_s": flops / (step_ms * 1e6),
        "floor_gflops_per_s": flops / (floor_ms * 1e6) if floor_ms > 0 else None,
        "shapes": [{"shape": list(shape), "ms": 1e3 * seconds}
                   for shape, seconds in table.items()],
    }


def run_floor(speed: dict | None = None, config: ModelConfig = THESIS2,
              methods: tuple[str, ...] = RTRL_METHODS, *, steps: int = 20, warmup: int = 5,
              device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
              seed: int = 0) -> dict:
    """Compare each RTRL step with bare products of the shapes it recorded.

    Parameters
    ----------
    speed : dict or None
        Output of :func:`~rtrl_moe.benchmarks.timing.run_speed` from the same
        run. When None, the RTRL methods are timed first with the other
        arguments.
    config, methods, steps, warmup, device, dtype, seed
        As in :func:`~rtrl_moe.benchmarks.timing.run_speed`. Each shape is
        timed with ``max(warmup, 1)`` untimed and ``steps`` timed products.

    Returns
    -------
    dict
        ``methods``: per method ``flops_per_step``, ``floor_ms``, ``step_ms``,
        ``efficiency`` (floor over step time) and the time of each distinct
        shape; ``targets``: the efficiency targets.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if speed is None:
        speed = run_speed(config, methods, steps=steps, warmup=warmup, device=device,
                          dtype=dtype, seed=seed)
    records = {}
    for method in methods:
        if method not in speed["methods"]:
            raise ValueError(f"the speed results hold no {method!r} measurement; "
                             f"run the speed suite with that method first")
        records[method] = floor_record(speed["methods"][method], dtype=dtype, device=device,
                                       warmup=max(warmup, 1), repeats=steps)

    targets = [at_least(f"{method} efficiency (floor / step time)",
                        records[method].get("efficiency"), minimum)
               for method, minimum in EFFICIENCY_TARGETS.items() if method in records]
    return {"config": speed["config"], "batch_size": speed["batch_size"],
            "methods": records, "targets": targets}
