"""Memory estimates of the gradient engines, checked before the sensitivity is allocated.

The dominant term of every RTRL engine is the sensitivity P = dh/dtheta, one
``H x n_params`` matrix per sample. The estimates below count P and the other
tensors whose size grows with ``n_params``, in the dtype of the model. They
leave out everything that does not scale with ``n_params`` (the model itself,
activations, small per-step factors), so they are estimates, not bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from torch import nn

from rtrl_moe._checks import check_int
from rtrl_moe.layout import ParameterLayout
from rtrl_moe.models import RecurrentMoE
from rtrl_moe.rtrl import DEFAULT_CAPACITY

# The default budget is this share of the free memory, which leaves room for
# the rest of the process and for allocator fragmentation.
DEFAULT_BUDGET_SHARE = 0.5


class MemoryBudgetError(ValueError):
    """The estimated memory of a gradient engine exceeds the memory budget."""

    def __init__(self, message: str, estimate: MemoryEstimate, budget: int) -> None:
        super().__init__(message)
        self.estimate, self.budget = estimate, budget


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory of one engine for one batch size.

    Attributes
    ----------
    method : str
        The gradient method.
    batch_size : int
        Samples per sequence.
    dtype : torch.dtype
        Dtype of the sensitivity and the Jacobians.
    total_bytes : int
        Sum of ``breakdown``.
    breakdown : dict of str to int
        Bytes per tensor kind, for example ``"sensitivity"`` or ``"state Jacobian"``.
        Empty for ``bptt``.
    """

    method: str
    batch_size: int
    dtype: torch.dtype
    total_bytes: int
    breakdown: dict[str, int]

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        head = f"{self.method} at batch_size={self.batch_size} in {dtype}"
        if not self.breakdown:
            return (f"{head}: no sensitivity (the BPTT graph grows with the sequence "
                    "length and is not estimated)")
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.breakdown.items())
        return f"{head}: {format_bytes(self.total_bytes)} ({parts})"


def format_bytes(size: int) -> str:
    """Format a byte count in GiB, MiB or KiB, whichever gives a number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def estimate_memory(model: nn.Module, method: str, batch_size: int,
                    dtype: torch.dtype | None = None, *,
                    capacity: int | None = None) -> MemoryEstimate:
    """Estimate the memory a gradient engine allocates, before allocating anything.

    Parameters
    ----------
    model : RecurrentMoE or DenseRNN
    method : str
        ``"bptt"``, ``"rtrl-dense"``, ``"rtrl-sparse"`` or ``"rtrl-lazy"``.
    batch_size : int
        Samples per sequence.
    dtype : torch.dtype, optional
        Dtype of the sensitivity; defaults to the dtype of the model parameters.
    capacity : int, optional
        Segment-tree capacity of ``rtrl-lazy`` (default 64); other methods reject it.

    Returns
    -------
    MemoryEstimate
        Let H be the state size, n the parameter count, B the batch size and s
        the dtype size. ``rtrl-dense`` keeps P and builds the next P
        (``2 B H n s``). Next to them it keeps the dense state Jacobian
        (``B H^2 s``) and the immediate Jacobians over all n columns.
        ``rtrl-sparse`` and ``rtrl-lazy`` keep one P plus the immediate blocks
        of the core and the selected experts. ``rtrl-lazy`` adds the last
        ``capacity`` step Jacobians. ``bptt`` keeps no sensitivity and is estimated as 0,
        because its graph grows with the sequence length instead.

    Raises
    ------
    ValueError
        For an unknown method, a method the model does not support, a
        ``batch_size`` below 1, a non-float dtype, or ``capacity`` given for a
        method other than ``rtrl-lazy``.
    """
    if method not in _ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(_ESTIMATORS)}")
    if method in ("rtrl-sparse", "rtrl-lazy") and not isinstance(model, RecurrentMoE):
        raise ValueError(f"method {method!r} needs RecurrentMoE, got {type(model).__name__}")
    check_int("batch_size", batch_size, minimum=1)
    if capacity is not None and method != "rtrl-lazy":
        raise ValueError(f"capacity applies to method 'rtrl-lazy' only, got method={method!r}")
    capacity = check_int("capacity", DEFAULT_CAPACITY if capacity is None else capacity, minimum=1)
    dtype = next(model.parameters()).dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")

    itemsize = torch.empty((), dtype=dtype).element_size()
    breakdown = _ESTIMATORS[method](model, ParameterLayout(model), batch_size, itemsize, capacity)
    return MemoryEstimate(method, batch_size, dtype, sum(breakdown.values()), breakdown)


def _estimate_bptt(model, layout, batch, itemsize, capacity) -> dict[str, int]:
    return {}


def _estimate_dense(model, layout, batch, itemsize, capacity) -> dict[str, int]:
    state, n = model.state_size, layout.n_params
    breakdown = {
        "sensitivity": batch * state * n * itemsize,
        "new sensitivity": batch * state * n * itemsize,
        "state Jacobian": batch * state * state * itemsize,
    }
    if isinstance(model, RecurrentMoE):
        d, k_write = model.d_model, model.k_write
        full_width = batch * (d + k_write) * n * itemsize
        breakdown["immediate Jacobians"] = _factor_bytes(model, layout, batch, itemsize) + full_width
        # The written rows come from two products over all columns and their sum.
        breakdown["written rows"] = 3 * batch * k_write * d * n * itemsize
    else:
        # The per-parameter Jacobians from jacrev and their concatenation.
        breakdown["immediate Jacobians"] = 2 * batch * state * n * itemsize
    breakdown["gradient"] = n * itemsize
    return breakdown


def _estimate_sparse(model, layout, batch, itemsize, capacity) -> dict[str, int]:
    d, k_write = model.d_model, model.k_write
    # The sparse engine builds the blocks of every selected expert at once and
    # updates the core columns and the expert columns in two passes.
    experts = min(layout.n_experts, batch * model.k_experts)
    widest = max(layout.n_core, layout.n_params - layout.n_core)
    return {
        "sensitivity": batch * model.state_size * layout.n_params * itemsize,
        "immediate Jacobians": _factor_bytes(model, layout, batch, itemsize),
        "expert immediate blocks": experts * batch * d * layout.expert_size * itemsize,
        "row products": (d + k_write) * widest * itemsize,
        "gradient": layout.n_params * itemsize,
    }


def _estimate_lazy(model, layout, batch, itemsize, capacity) -> dict[str, int]:
    d, k_write = model.d_model, model.k_write
    breakdown = _estimate_sparse(model, layout, batch, itemsize, capacity)
    # The lazy engine updates the core and then one expert at a time.
    breakdown["expert immediate blocks"] = batch * d * layout.expert_size * itemsize
    widest = max(layout.n_core, layout.expert_size)
    breakdown["row products"] = (d + k_write) * widest * itemsize
    breakdown["segment tree"] = capacity * _leaf_bytes(model, batch, itemsize)
    return breakdown


def _factor_bytes(model: RecurrentMoE, layout: ParameterLayout, batch: int,
                  itemsize: int) -> int:
    """Return the size of the immediate blocks of ``moe_step_factors`` (core and selected experts)."""
    d, k_write = model.d_model, model.k_write
    core = (d + k_write) * layout.n_core
    selected = d * model.k_experts * layout.expert_size
    return batch * (core + selected) * itemsize


def _leaf_bytes(model: RecurrentMoE, batch: int, itemsize: int) -> int:
    """Return the size of one tree leaf: the kept factors and the row-sparse J_t.

    NOTE: products of several steps, built on demand by tree queries, are not
    counted. Each can reach ``B H^2`` values.
    """
    d, k_read, k_write = model.d_model, model.k_read, model.k_write
    factors = d * k_read * d + k_write * k_write * d + d + k_write + k_write * d
    jacobian = k_write * d * model.state_size
    return batch * (factors + jacobian) * itemsize


_ESTIMATORS = {
    "bptt": _estimate_bptt,
    "rtrl-dense": _estimate_dense,
    "rtrl-sparse": _estimate_sparse,
    "rtrl-lazy": _estimate_lazy,
}


def default_memory_budget(device: torch.device) -> tuple[int, str]:
    """Return the default budget in bytes and a description of where it comes from.

    The budget is ``DEFAULT_BUDGET_SHARE`` of the free memory of ``device``:
    free GPU memory on CUDA, available host memory otherwise. On CUDA, memory
    that torch's caching allocator has reserved but not handed out counts as
    free, because the previous sequence's sensitivity usually sits there.
    """
    share = f"{DEFAULT_BUDGET_SHARE:.0%}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (int(DEFAULT_BUDGET_SHARE * (free + cached)),
                f"{share} of the free memory on {device}")
    available = psutil.virtual_memory().available
    return int(DEFAULT_BUDGET_SHARE * available), f"{share} of the available host memory"


def check_memory_budget(estimate: MemoryEstimate, budget: int | None,
                        device: torch.device) -> None:
    """Raise :class:`MemoryBudgetError` if ``estimate`` exceeds the budget.

    ``budget`` in bytes; None takes :func:`default_memory_budget` of ``device``.
    """
    if budget is None:
        budget, source = default_memory_budget(device)
    else:
        source = "the memory_budget setting"
    if estimate.total_bytes <= budget:
        return

    message = (f"{estimate.method} needs an estimated {format_bytes(estimate.total_bytes)} "
               f"for batch_size={estimate.batch_size}, above the memory budget of "
               f"{format_bytes(budget)} ({source}); lower batch_size, use a smaller model "
               "(fewer slots or experts, a smaller d_model) or raise memory_budget (bytes). "
               f"Estimate: {estimate}")
    raise MemoryBudgetError(message, estimate, budget)
