"""Speed, efficiency, scaling, batch and memory benchmarks of the gradient engines.

Run ``python -m rtrl_moe.benchmarks --help`` for the command line, or call the
suite functions from Python, for example in a notebook::

    from rtrl_moe.benchmarks import THESIS2, run_speed, run_floor
    speed = run_speed(THESIS2, steps=20, warmup=5)
    floor = run_floor(speed)

docs/benchmarks.md explains what each suite measures and how to read it.
"""

from rtrl_moe.benchmarks.config import (ALL_METHODS, FULL_SWEEPS, RTRL_METHODS, SUITES, THESIS2,
                                        TINY, TINY_SWEEPS, ModelConfig, Sweeps)
from rtrl_moe.benchmarks.floor import floor_per_step, run_floor, time_bmm, time_shapes
from rtrl_moe.benchmarks.memory import run_memory
from rtrl_moe.benchmarks.meta import collect_meta
from rtrl_moe.benchmarks.sweeps import run_batch, run_scaling
from rtrl_moe.benchmarks.timing import StepTiming, run_speed, time_bptt, time_rtrl

__all__ = [
    "ALL_METHODS",
    "FULL_SWEEPS",
    "RTRL_METHODS",
    "SUITES",
    "THESIS2",
    "TINY",
    "TINY_SWEEPS",
    "ModelConfig",
    "StepTiming",
    "Sweeps",
    "collect_meta",
    "floor_per_step",
    "run_batch",
    "run_floor",
    "run_memory",
    "run_scaling",
    "run_speed",
    "time_bmm",
    "time_bptt",
    "time_rtrl",
    "time_shapes",
]
