"""Per-step wall-clock timing of the gradient engines and the speed suite.

RTRL engines are timed step by step with no loss: a step is the forward step
plus the sensitivity update, which is the cost that RTRL adds per step.
BPTT has no per-step gradient work, so it is timed by whole windows. A window
is ``steps`` forward steps with a cross-entropy loss at every step (random
targets) followed by one backward pass over the window. Its per-step time is
the window time divided by ``steps``.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rtrl_moe.benchmarks.config import (ALL_METHODS, MEMORY_SHARE, THESIS2, ModelConfig,
                                        available_bytes, memory_skip_reason,
                                        resolve_device, resolve_dtype, synchronize,
                                        validate_counts, validate_methods)
from rtrl_moe.benchmarks.targets import SPEEDUP_TARGETS, at_least
from rtrl_moe.gradients import make_engine
from rtrl_moe.layout import ParameterLayout
from rtrl_moe.seeding import set_seed
from rtrl_moe.tasks import RandomOneHot

logger = logging.getLogger(__name__)

# Number of timed BPTT windows; the reported per-step time is the median over them.
BPTT_WINDOWS = 5


@dataclass
class StepTiming:
    """Timing of one engine at one batch size.

    ``seconds`` contains one value per timed RTRL step, or per BPTT window (window
    time divided by its steps). ``flops`` and ``matmuls`` contain, per timed RTRL
    step, the FLOPs and the ``(batch, m, k, n)`` shapes of the products on the
    sensitivity. ``skipped`` is the reason when the point was not measured.
    """

    method: str
    batch_size: int
    seconds: list[float] = field(default_factory=list)
    timed_steps: int = 0
    flops: list[int] = field(default_factory=list)
    matmuls: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    skipped: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def step_seconds(self) -> float | None:
        """Median seconds per step, or None when skipped."""
        return statistics.median(self.seconds) if self.seconds and not self.skipped else None

    def summary(self, with_shapes: bool = False) -> dict:
        """Return a JSON-ready record; ``with_shapes`` adds the per-step product shapes."""
        record = {"method": self.method, "batch_size": self.batch_size}
        if self.skipped:
            record.update(status="skipped", reason=self.skipped)
            if self.flops:
                record["flops_per_step"] = statistics.median(self.flops)
            return record

        step = self.step_seconds
        record.update(
            status="ok",
            timed_steps=self.timed_steps,
            step_ms=1e3 * step,
            step_ms_mean=1e3 * statistics.fmean(self.seconds),
            step_ms_min=1e3 * min(self.seconds),
            step_ms_max=1e3 * max(self.seconds),
            per_sample_ms=1e3 * step / self.batch_size,
            flops_per_step=statistics.median(self.flops) if self.flops else None,
        )
        record.update(self.extra)
        if with_shapes and self.matmuls:
            record["matmuls"] = [[list(shape) for shape in step] for step in self.matmuls]
        return record


class TimeGuard:
    """Stop a point early when its projected run time exceeds a limit.

    The projection takes the smaller of the last unit's time and the mean so
    far, so that one slow unit (a lazy catch-up step, say) does not stop a
    point alone. The first unit also carries one-time costs, so after it
    alone the point stops only if the projection exceeds twice the limit.
    """

    def __init__(self, limit: float | None, total_units: int, unit: str) -> None:
        self.limit = limit or None
        self.total_units = total_units
        self.unit = unit
        self.start = time.perf_counter()

    def reason(self, done: int, last: float) -> str | None:
        """Return why to stop after ``done`` units, the last taking ``last`` s, or None."""
        if self.limit is None or done >= self.total_units:
            return None
        elapsed = time.perf_counter() - self.start
        projected = elapsed + min(last, elapsed / done) * (self.total_units - done)
        allowed = 2 * self.limit if done == 1 else self.limit
        if projected <= allowed:
            return None
        return (f"projected {projected:.0f} s for {self.total_units} {self.unit} exceeds "
                f"the limit of {self.limit:g} s per point (--max-point-seconds)")


def sample_inputs(config: ModelConfig, batch_size: int, length: int, seed: int,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    """Return random one-hot inputs (``B, T, d_in``), identical for equal arguments."""
    generator = torch.Generator().manual_seed(seed)
    inputs = RandomOneHot(config.d_in, length).sample(batch_size, generator).inputs
    return inputs.to(device=device, dtype=dtype)


def sample_targets(config: ModelConfig, batch_size: int, length: int, seed: int,
                   device: torch.device) -> Tensor:
    """Return random class targets (``B, T``) for a loss at every step."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, config.d_out, (batch_size, length), generator=generator)
    return targets.to(device)


def time_rtrl(model: nn.Module, method: str, inputs: Tensor, warmup: int,
              max_seconds: float | None = None) -> StepTiming:
    """Time the steps of an RTRL engine over ``inputs`` (``B, warmup + steps, d_in``).

    The first ``warmup`` steps are run but not timed. Steps carry no loss.
    """
    device = inputs.device
    batch, total = inputs.shape[0], inputs.shape[1]
    timing = StepTiming(method, batch)
    guard = TimeGuard(max_seconds, total, "steps")
    # The same budget as the skip check in measure_method, so a point that
    # passed that check is not rejected by the engine's default budget.
    budget = int(MEMORY_SHARE * available_bytes(device))
    engine = make_engine(model, method, memory_budget=budget)
    engine.begin(batch)

    for t in range(total):
        synchronize(device)
        start = time.perf_counter()
        engine.step(inputs[:, t])
        synchronize(device)
        elapsed = time.perf_counter() - start

        stats = engine.stats[-1]
        if t >= warmup:
            timing.seconds.append(elapsed)
            timing.flops.append(int(stats["flops"]))
            timing.matmuls.append([tuple(shape) for shape in stats["matmuls"]])
        reason = guard.reason(t + 1, elapsed)
        if reason:
            # Keep the FLOPs of the last step run so that a skipped point still reports them.
            timing.skipped = reason
            timing.flops = timing.flops or [int(stats["flops"])]
            break
    timing.timed_steps = len(timing.seconds)
    return timing


def time_bptt(model: nn.Module, inputs: Tensor, targets: Tensor, warmup: int,
              windows: int = BPTT_WINDOWS, max_seconds: float | None = None) -> StepTiming:
    """Time BPTT windows over ``inputs`` (``B, T, d_in``) with a loss at every step.

    One untimed window runs first when ``warmup > 0``. Each timed window is
    ``T`` forward steps with losses plus one backward pass.
    """
    batch, length = inputs.shape[0], inputs.shape[1]
    timing = StepTiming("bptt", batch)
    engine = make_engine(model, "bptt")
    if warmup > 0:
        _run_bptt_window(engine, inputs, targets)

    guard = TimeGuard(max_seconds, windows, "BPTT windows")
    forward, backward = [], []
    for done in range(1, windows + 1):
        forward_seconds, backward_seconds = _run_bptt_window(engine, inputs, targets)
        forward.append(forward_seconds)
        backward.append(backward_seconds)
        timing.seconds.append((forward_seconds + backward_seconds) / length)
        reason = guard.reason(done, forward_seconds + backward_seconds)
        if reason:
            timing.skipped = reason
            break

    timing.timed_steps = len(timing.seconds) * length
    timing.extra = {"window_steps": length, "windows": len(timing.seconds),
                    "forward_ms_per_step": 1e3 * statistics.median(forward) / length,
                    "backward_ms_per_window": 1e3 * statistics.median(backward)}
    return timing


def _run_bptt_window(engine, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """Run one BPTT window; return the forward and the backward seconds."""
    device = inputs.device
    engine.begin(inputs.shape[0])
    synchronize(device)
    start = time.perf_counter()
    for t in range(inputs.shape[1]):
        engine.step(inputs[:, t], targets[:, t])
    synchronize(device)
    middle = time.perf_counter()
    engine.take_gradients()
    synchronize(device)
    return middle - start, time.perf_counter() - middle


def measure_method(model: nn.Module, config: ModelConfig, method: str, batch_size: int, *,
                   steps: int, warmup: int, seed: int, max_seconds: float | None = None
                   ) -> StepTiming:
    """Time one method on ``model`` at one batch size, or record why it was skipped.

    Every method gets the same inputs for the same ``seed``. A point that would
    not fit in memory is skipped before it starts, and one whose projected time
    exceeds ``max_seconds`` (None or 0: no limit) is stopped early.
    """
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    n_params = ParameterLayout(model).n_params
    reason = memory_skip_reason(method, config, batch_size, n_params, dtype, device)
    if reason:
        logger.warning("%s, batch size %d: skipped: %s", method, batch_size, reason)
        return StepTiming(method, batch_size, skipped=reason)

    logger.info("timing %s at batch size %d (%d parameters)", method, batch_size, n_params)
    try:
        if method == "bptt":
            inputs = sample_inputs(config, batch_size, steps, seed, device, dtype)
            targets = sample_targets(config, batch_size, steps, seed, device)
            timing = time_bptt(model, inputs, targets, warmup, max_seconds=max_seconds)
        else:
            inputs = sample_inputs(config, batch_size, warmup + steps, seed, device, dtype)
            timing = time_rtrl(model, method, inputs, warmup, max_seconds=max_seconds)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if timing.skipped:
        logger.warning("%s, batch size %d: skipped: %s", method, batch_size, timing.skipped)
    else:
        logger.info("%s: %.3f ms per step", method, 1e3 * timing.step_seconds)
    return timing


def speed_ratios(step_ms: dict[str, float | None]) -> dict[str, float | None]:
    """Return the dense/sparse and dense/lazy speed-ups and each RTRL time over BPTT's."""
    def ratio(numerator: str, denominator: str) -> float | None:
        top, bottom = step_ms.get(numerator), step_ms.get(denominator)
        return top / bottom if top and bottom else None

    ratios = {"dense/sparse": ratio("rtrl-dense", "rtrl-sparse"),
              "dense/lazy": ratio("rtrl-dense", "rtrl-lazy")}
    for method in ("rtrl-dense", "rtrl-sparse", "rtrl-lazy"):
        ratios[f"{method}/bptt"] = ratio(method, "bptt")
    return ratios


def run_speed(config: ModelConfig = THESIS2, methods: tuple[str, ...] = ALL_METHODS, *,
              steps: int = 20, warmup: int = 5, device: str | torch.device = "cpu",
              dtype: str | torch.dtype = "float32", batch_size: int = 1, seed: int = 0) -> dict:
    """Measure the median per-step time of each method on one model.

    Parameters
    ----------
    config : ModelConfig
        Model size; the default is the thesis-2 configuration.
    methods : tuple of str
        Any of ``"rtrl-dense"``, ``"rtrl-sparse"``, ``"rtrl-lazy"``, ``"bptt"``.
    steps, warmup : int
        Timed steps (BPTT: window length) and untimed steps before them.
    device, dtype : str or torch object
        Where and in which precision to run.
    batch_size : int
        Samples per step.
    seed : int
        Seed of the model initialisation and of the inputs.

    Returns
    -------
    dict
        ``methods`` (one record per method, with the per-step product shapes
        of the RTRL engines), ``ratios`` (``dense/sparse``, ``dense/lazy`` and
        ``<method>/bptt``, all ratios of median step times) and ``targets``.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    validate_counts(steps=steps, warmup=warmup, batch_size=batch_size)
    validate_methods(methods)
    set_seed(seed, deterministic=False)
    model = config.build(dtype, device)

    records = {}
    for method in methods:
        timing = measure_method(model, config, method, batch_size, steps=steps,
                                warmup=warmup, seed=seed + 1)
        records[method] = timing.summary(with_shapes=True)

    step_ms = {m: r.get("step_ms") for m, r in records.items()}
    ratios = speed_ratios(step_ms)
    targets = [at_least(f"{name} speed-up (rtrl-{name.split('/')[1]} vs rtrl-dense)",
                        ratios[name], minimum) for name, minimum in SPEEDUP_TARGETS.items()]
    return {"config": config.as_dict(), "batch_size": batch_size,
            "n_params": ParameterLayout(model).n_params, "state_size": config.state_size,
            "steps": steps, "warmup": warmup, "methods": records, "ratios": ratios,
            "targets": targets}
