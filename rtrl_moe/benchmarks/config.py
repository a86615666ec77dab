"""Model sizes, sweeps and the device and dtype helpers shared by the suites."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import psutil
import torch

from rtrl_moe.layout import ParameterLayout
from rtrl_moe.models import RecurrentMoE

RTRL_METHODS = ("rtrl-dense", "rtrl-sparse", "rtrl-lazy")
ALL_METHODS = RTRL_METHODS + ("bptt",)
SUITES = ("speed", "floor", "scaling", "batch", "memory")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# A point whose estimated memory exceeds this share of the free memory is skipped.
MEMORY_SHARE = 0.9


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of :class:`~rtrl_moe.RecurrentMoE`.

    The defaults are the thesis-2 configuration that the speed, floor, batch
    and memory suites measure.
    """

    d_in: int = 8
    d_out: int = 4
    d_model: int = 64
    n_heads: int = 2
    n_slots: int = 8
    n_experts: int = 16
    k_experts: int = 2
    k_read: int = 2
    k_write: int = 2

    @property
    def state_size(self) -> int:
        """Number of state entries H per sample."""
        return self.n_slots * self.d_model

    def replace(self, **changes: int) -> ModelConfig:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        """Return the fields by name (JSON-ready)."""
        return dataclasses.asdict(self)

    def build(self, dtype: torch.dtype, device: torch.device) -> RecurrentMoE:
        """Create the model with the current torch seed, in ``dtype`` on ``device``."""
        model = RecurrentMoE(**self.as_dict())
        return model.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Sweeps:
    """Values swept by the scaling, batch and memory suites."""

    n_slots: tuple[int, ...] = (4, 8, 16, 32)
    n_experts: tuple[int, ...] = (4, 16, 64)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    lengths: tuple[int, ...] = (64, 256, 1024, 4096)


THESIS2 = ModelConfig()
FULL_SWEEPS = Sweeps()

# Small enough that every suite finishes in seconds; used by ``--tiny`` and the tests.
TINY = ModelConfig(d_in=4, d_out=3, d_model=8, n_heads=2, n_slots=4, n_experts=4)
TINY_SWEEPS = Sweeps(n_slots=(2, 4), n_experts=(2, 4), batch_sizes=(1, 2), lengths=(8, 16))


def resolve_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a ``torch.device``; raise ``ValueError`` if CUDA is requested but absent."""
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False; "
                         "run with --device cpu or on a machine with a CUDA GPU and a CUDA build "
                         f"of torch (installed: {torch.__version__})")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return ``dtype`` as a ``torch.dtype``; only float32 and float64 are accepted."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name of a floating point dtype, e.g. ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a host clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_parameters(config: ModelConfig) -> int:
    """Return the number of sensitivity columns (parameters) of ``config``'s model.

    The global torch random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        return ParameterLayout(RecurrentMoE(**config.as_dict())).n_params


def estimate_bytes(method: str, config: ModelConfig, batch_size: int, n_params: int,
                   itemsize: int) -> int:
    """Estimate the largest extra memory (bytes) a method's engine allocates at once.

    Dense RTRL keeps the old and the new sensitivity and the dense state
    Jacobian at the same time. The sparse engines keep one sensitivity plus
    copies of the read, written and updated rows. BPTT is counted as zero here because its memory
    grows with the sequence length instead (see the memory suite).
    """
    if method == "bptt":
        return 0
    sensitivity = batch_size * config.state_size * n_params * itemsize
    if method == "rtrl-dense":
        return 2 * sensitivity + batch_size * config.state_size ** 2 * itemsize
    copied_rows = (config.k_read + config.k_write) * config.d_model \
        + 2 * (config.d_model + config.k_write)
    return sensitivity + batch_size * copied_rows * n_params * itemsize


def available_bytes(device: torch.device) -> int:
    """Return the free memory of ``device`` in bytes (host memory for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def memory_skip_reason(method: str, config: ModelConfig, batch_size: int, n_params: int,
                       dtype: torch.dtype, device: torch.device) -> str | None:
    """Return why a point would not fit in memory, or None when it fits."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = estimate_bytes(method, config, batch_size, n_params, itemsize)
    free = available_bytes(device)
    if needed <= MEMORY_SHARE * free:
        return None
    return (f"estimated {needed / 2**30:.1f} GiB for {method} at batch size {batch_size} "
            f"exceeds {MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device.type}")


def validate_counts(**counts: int) -> None:
    """Raise ``ValueError`` unless each count is an int >= 1 (``warmup``: >= 0)."""
    for name, value in counts.items():
        minimum = 0 if name == "warmup" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate_methods(methods: tuple[str, ...], allowed: tuple[str, ...] = ALL_METHODS) -> None:
    """Raise ``ValueError`` unless ``methods`` is a non-empty subset of ``allowed``."""
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(allowed)}, "
                         f"got {list(methods)}")
