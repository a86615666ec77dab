"""Argument checks shared by the models, the trainers and the tasks."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_int(name: str, value: object, *, minimum: int | None = None,
              maximum: int | None = None, maximum_name: str | None = None) -> int:
    """Return ``value`` if it is an int within bounds, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    if maximum is not None and value > maximum:
        bound = f"{maximum_name}={maximum}" if maximum_name else str(maximum)
        raise ValueError(f"{name} must be <= {bound}, got {name}={value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {name}={value}")
    return float(value)


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` contains NaN or infinity."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s)")


def check_step_inputs(model: torch.nn.Module, x: Tensor, h: Tensor) -> None:
    """Check the shapes and values of one step's input ``x`` and state ``h``."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != model.d_in:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (batch, d_in={model.d_in}), got {shape}")
    if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[1] != model.state_size:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"h must have shape (batch, H={model.state_size}), got {shape}")
    if x.shape[0] != h.shape[0]:
        raise ValueError(f"x and h must have the same batch size, got {x.shape[0]} and {h.shape[0]}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")


class NonFiniteError(FloatingPointError):
    """A loss, state, Jacobian or sensitivity became NaN or infinite during training."""

    def __init__(self, *, step: int, method: str, what: str, group: str | None = None) -> None:
        self.step, self.method, self.what, self.group = step, method, what, group
        where = f" for parameter group {group}" if group else ""
        super().__init__(
            f"non-finite {what}{where} at step {step} of method {method!r}; "
            "lower the learning rate, clip gradients or check the inputs"
        )
