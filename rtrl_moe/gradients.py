"""``compute_gradients``: one entry point for every gradient method."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtrl_moe._checks import check_int
from rtrl_moe.bptt import BPTTEngine
from rtrl_moe.models import RecurrentMoE
from rtrl_moe.rtrl import (DEFAULT_CAPACITY, IGNORE_INDEX, DenseRTRL, GradientEngine,
                           LazyRTRL, SparseRTRL)

METHODS = ("bptt", "rtrl-dense", "rtrl-sparse", "rtrl-lazy")
SPARSE_METHODS = ("rtrl-sparse", "rtrl-lazy")


def make_engine(model: nn.Module, method: str, *, capacity: int | None = None,
                catch_up: str | None = None, memory_budget: int | None = None) -> GradientEngine:
    """Build the engine for ``method``; ``capacity`` and ``catch_up`` apply to ``rtrl-lazy`` only.

    ``memory_budget`` (bytes, RTRL methods) caps the estimated memory checked
    before the sensitivity is allocated; None takes half of the free memory.
    BPTT keeps no sensitivity, so it accepts and ignores the budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method in SPARSE_METHODS and not isinstance(model, RecurrentMoE):
        raise ValueError(
            f"method {method!r} needs the write-set structure of RecurrentMoE, "
            f"got {type(model).__name__}; use 'bptt' or 'rtrl-dense'"
        )
    for name, value in [("capacity", capacity), ("catch_up", catch_up)]:
        if value is not None and method != "rtrl-lazy":
            raise ValueError(f"{name} applies to method 'rtrl-lazy' only, got method={method!r}")
    if memory_budget is not None:
        check_int("memory_budget", memory_budget, minimum=1)

    if method == "bptt":
        return BPTTEngine(model)
    if method == "rtrl-dense":
        return DenseRTRL(model, memory_budget)
    if method == "rtrl-sparse":
        return SparseRTRL(model, memory_budget)
    capacity = DEFAULT_CAPACITY if capacity is None else capacity
    return LazyRTRL(model, check_int("capacity", capacity, minimum=1), catch_up or "auto",
                    memory_budget)


def validate_sequence(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Check a batch of sequences and return the targets as ``(B, T)`` with -100 for no loss."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 3:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must have shape (batch, steps, d_in), got {shape}")
    batch, steps, width = inputs.shape
    if batch < 1 or steps < 1:
        raise ValueError(f"inputs must have batch >= 1 and steps >= 1, got shape {tuple(inputs.shape)}")
    if width != model.d_in:
        raise ValueError(f"inputs must have d_in={model.d_in} features, got {width}")
    dtype = next(model.parameters()).dtype
    if inputs.dtype != dtype:
        raise ValueError(f"inputs dtype {inputs.dtype} does not match the model dtype {dtype}; "
                         "convert the inputs or the model (for example model.double())")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"inputs must be finite, got {int((~torch.isfinite(inputs)).sum())} "
                         "non-finite value(s)")
    return _validate_targets(model, targets, batch, steps)


def _validate_targets(model: nn.Module, targets: Tensor, batch: int, steps: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dtype in (torch.bool,) or targets.is_floating_point() \
            or targets.is_complex():
        kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of class indices, got {kind}")
    if targets.dim() == 1 and targets.shape[0] == batch:
        full = torch.full((batch, steps), IGNORE_INDEX, dtype=torch.long, device=targets.device)
        full[:, -1] = targets
        targets = full
    elif targets.dim() != 2 or tuple(targets.shape) != (batch, steps):
        raise ValueError(f"targets must have shape ({batch},) or ({batch}, {steps}) to match the "
                         f"inputs, got {tuple(targets.shape)}")

    targets = targets.long()
    valid = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < model.d_out))
    if not bool(valid.all()):
        bad = int(targets[~valid][0])
        raise ValueError(f"targets must be in 0..{model.d_out - 1} or {IGNORE_INDEX}, got {bad}")
    return targets


def compute_gradients(model: nn.Module, inputs: Tensor, targets: Tensor, *, method: str,
                      **options) -> dict[str, Tensor]:
    """Return the gradient of the summed per-step loss, by parameter name.

    Parameters
    ----------
    model : RecurrentMoE or DenseRNN
    inputs : Tensor
        ``(B, T, d_in)``, same dtype as the model.
    targets : Tensor
        ``(B,)`` for a loss at the last step only, or ``(B, T)`` with -100 where
        a step has no loss. The loss is cross-entropy, averaged over the samples
        that have a target at a step and summed over steps.
    method : str
        ``"bptt"``, ``"rtrl-dense"``, ``"rtrl-sparse"`` or ``"rtrl-lazy"``.
    **options
        ``capacity`` (int >= 1, ``rtrl-lazy`` only): how many recent state
        Jacobians the segment tree keeps; default 64. ``catch_up`` (``rtrl-lazy``
        only) sets how a dormant expert is brought up to date. ``"tree"``
        applies one range product from the tree and ``"sequential"`` applies
        the stored steps one by one. ``"auto"``, the default, picks the cheaper
        of the two by a FLOP estimate.
        ``memory_budget`` (bytes, RTRL methods): the largest estimated memory
        allowed before the sensitivity is allocated (see
        :func:`rtrl_moe.estimate_memory`); default half of the free memory.

    ``.grad`` of the parameters is left untouched.
    """
    unknown = sorted(set(options) - {"capacity", "catch_up", "memory_budget"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; expected 'capacity', "
                         "'catch_up' or 'memory_budget'")
    engine = make_engine(model, method, **options)
    targets = validate_sequence(model, inputs, targets)

    engine.begin(inputs.shape[0])
    for t in range(inputs.shape[1]):
        engine.step(inputs[:, t], targets[:, t])
    return engine.take_gradients()
