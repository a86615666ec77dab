"""The scaling suite (model size sweeps) and the batch suite (per-sample cost)."""

from __future__ import annotations

import logging

import torch

from rtrl_moe.benchmarks.config import (ALL_METHODS, FULL_SWEEPS, RTRL_METHODS, THESIS2,
                                        ModelConfig, count_parameters, resolve_device,
                                        resolve_dtype, validate_counts, validate_methods)
from rtrl_moe.benchmarks.timing import StepTiming, measure_method
from rtrl_moe.seeding import set_seed

logger = logging.getLogger(__name__)


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top and bottom else None


def _time_config(config: ModelConfig, methods: tuple[str, ...], batch_size: int, *,
                 steps: int, warmup: int, device: torch.device, dtype: torch.dtype,
                 seed: int, max_seconds: float | None,
                 max_batch: dict[str, int] | None = None) -> dict[str, dict]:
    """Build one model and return a summary record per method."""
    set_seed(seed, deterministic=False)
    model = config.build(dtype, device)
    records = {}
    for method in methods:
        cap = (max_batch or {}).get(method)
        if cap is not None and batch_size > cap:
            reason = f"batch size {batch_size} > --max-batch {method}={cap}"
            logger.info("%s, batch size %d: skipped: %s", method, batch_size, reason)
            timing = StepTiming(method, batch_size, skipped=reason)
        else:
            timing = measure_method(model, config, method, batch_size, steps=steps,
                                    warmup=warmup, seed=seed + 1, max_seconds=max_seconds)
        records[method] = timing.summary()
    return records


def run_scaling(config: ModelConfig = THESIS2, *, n_slots: tuple[int, ...] = FULL_SWEEPS.n_slots,
                n_experts: tuple[int, ...] = FULL_SWEEPS.n_experts,
                methods: tuple[str, ...] = RTRL_METHODS, steps: int = 20, warmup: int = 5,
                device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                seed: int = 0, max_seconds: float | None = None) -> dict:
    """Time each method while ``n_slots``, then ``n_experts``, varies around ``config``.

    Parameters
    ----------
    config : ModelConfig
        The model every sweep starts from; one field changes at a time.
    n_slots, n_experts : tuple of int
        Values of each swept field.
    methods : tuple of str
        Methods to time (BPTT is allowed but not part of the default).
    steps, warmup, device, dtype, seed
        As in :func:`~rtrl_moe.benchmarks.timing.run_speed`.
    max_seconds : float or None
        Stop a (method, point) early and mark it skipped when its projected
        time exceeds this many seconds; None or 0 means no limit.

    Returns
    -------
    dict
        ``points``: one record per swept value with the model size, a record per
        method (batch size 1) and the FLOP and time ratios dense/sparse and
        dense/lazy. A point equal to ``config`` is timed once and reused.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    validate_counts(steps=steps, warmup=warmup)
    validate_methods(methods)
    cache: dict[ModelConfig, dict[str, dict]] = {}
    points = []
    for field, values in (("n_slots", n_slots), ("n_experts", n_experts)):
        for value in values:
            swept = config.replace(**{field: value, **_fitted_top_k(config, field, value)})
            logger.info("scaling: %s=%d", field, value)
            if swept not in cache:
                cache[swept] = _time_config(swept, methods, 1, steps=steps, warmup=warmup,
                                            device=device, dtype=dtype, seed=seed,
                                            max_seconds=max_seconds)
            points.append(_scaling_point(field, value, swept, cache[swept]))
    return {"config": config.as_dict(), "batch_size": 1, "steps": steps, "warmup": warmup,
            "max_point_seconds": max_seconds, "points": points}


def _fitted_top_k(config: ModelConfig, field: str, value: int) -> dict[str, int]:
    """Lower the top-k sizes that a swept value makes too large for the model."""
    if field == "n_slots":
        return {"k_read": min(config.k_read, value), "k_write": min(config.k_write, value)}
    return {"k_experts": min(config.k_experts, value)}


def _scaling_point(field: str, value: int, config: ModelConfig, records: dict[str, dict]
                   ) -> dict:
    flops = {m: r.get("flops_per_step") for m, r in records.items()}
    step_ms = {m: r.get("step_ms") for m, r in records.items()}
    return {
        "parameter": field, "value": value, "config": config.as_dict(),
        "n_params": count_parameters(config), "state_size": config.state_size,
        "methods": records,
        "flop_ratio_dense_sparse": _ratio(flops.get("rtrl-dense"), flops.get("rtrl-sparse")),
        "flop_ratio_dense_lazy": _ratio(flops.get("rtrl-dense"), flops.get("rtrl-lazy")),
        "time_ratio_dense_sparse": _ratio(step_ms.get("rtrl-dense"), step_ms.get("rtrl-sparse")),
        "time_ratio_dense_lazy": _ratio(step_ms.get("rtrl-dense"), step_ms.get("rtrl-lazy")),
    }


def run_batch(config: ModelConfig = THESIS2, *,
              batch_sizes: tuple[int, ...] = FULL_SWEEPS.batch_sizes,
              methods: tuple[str, ...] = ALL_METHODS, steps: int = 20, warmup: int = 5,
              device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
              seed: int = 0, max_seconds: float | None = None,
              max_batch: dict[str, int] | None = None) -> dict:
    """Time each method at each batch size and report the cost per sample.

    Parameters are as in :func:`run_scaling`, and ``max_batch`` maps a method
    to the largest batch size to time it at. A (method, batch size) point above
    that cap, one that would not fit in free memory, or one whose projected
    time exceeds ``max_seconds`` is recorded with ``status`` "skipped" and its
    reason.

    Returns
    -------
    dict
        ``points``: one record per batch size with a record per method, whose
        ``per_sample_ms`` is the median step time divided by the batch size.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    validate_counts(steps=steps, warmup=warmup)
    validate_methods(methods)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    points = []
    for batch_size in batch_sizes:
        logger.info("batch: batch size %d", batch_size)
        records = _time_config(config, methods, batch_size, steps=steps, warmup=warmup,
                               device=device, dtype=dtype, seed=seed, max_seconds=max_seconds,
                               max_batch=max_batch)
        points.append({"batch_size": batch_size, "methods": records})
    return {"config": config.as_dict(), "steps": steps, "warmup": warmup,
            "max_point_seconds": max_seconds, "max_batch": max_batch or {}, "points": points}
