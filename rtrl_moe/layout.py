"""Flat column layout of a model's parameters for the sensitivity matrix.

The sensitivity P = dh/dtheta has one column per parameter entry. Columns are
ordered as ``[core | expert 0 | expert 1 | ...]``: the core block holds every
parameter outside the expert bank in ``named_parameters()`` order, and each
expert block holds that expert's slice of every expert-bank parameter. Keeping
each expert's columns contiguous lets the lazy trainer update one expert's
sensitivity as a plain column slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rtrl_moe.models import EXPERT_PREFIX


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    numel: int


class ParameterLayout:
    """Map between named parameters and flat sensitivity columns.

    Attributes
    ----------
    n_core : int
        Number of columns in the core block.
    n_experts : int
        Number of experts (0 for a model without an expert bank).
    expert_size : int
        Number of columns of one expert block.
    n_params : int
        Total number of columns.
    """

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        self._core = [_Entry(n, tuple(p.shape), p.numel())
                      for n, p in named if not n.startswith(EXPERT_PREFIX)]
        stacked = [(n, p) for n, p in named if n.startswith(EXPERT_PREFIX)]
        self.n_experts = stacked[0][1].shape[0] if stacked else 0
        self._expert = [_Entry(n, tuple(p.shape[1:]), p[0].numel()) for n, p in stacked]

        self.n_core = sum(e.numel for e in self._core)
        self.expert_size = sum(e.numel for e in self._expert)
        self.n_params = self.n_core + self.n_experts * self.expert_size
        self.group_names = ["core"] + [f"expert {e}" for e in range(self.n_experts)]

    def expert_slice(self, expert: int) -> slice:
        """Return the column slice of one expert block."""
        start = self.n_core + expert * self.expert_size
        return slice(start, start + self.expert_size)

    def flatten_core(self, tensors: dict[str, Tensor], batch_dims: int) -> Tensor:
        """Concatenate per-parameter tensors with ``batch_dims`` leading dims into columns."""
        parts = [tensors[e.name].reshape(*tensors[e.name].shape[:batch_dims], e.numel)
                 for e in self._core]
        return torch.cat(parts, dim=-1)

    def flatten_experts(self, tensors: dict[str, Tensor], batch_dims: int) -> Tensor:
        """Concatenate gathered expert tensors (short names, ``batch_dims`` leading dims)."""
        parts = []
        for entry in self._expert:
            short = entry.name[len(EXPERT_PREFIX):]
            tensor = tensors[short]
            parts.append(tensor.reshape(*tensor.shape[:batch_dims], entry.numel))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat gradient (``n_params``) into tensors named as in the model."""
        result: dict[str, Tensor] = {}
        core = flat[: self.n_core].split([e.numel for e in self._core])
        for entry, part in zip(self._core, core):
            result[entry.name] = part.reshape(entry.shape)

        if self.n_experts:
            blocks = flat[self.n_core:].reshape(self.n_experts, self.expert_size)
            pieces = blocks.split([e.numel for e in self._expert], dim=1)
            for entry, part in zip(self._expert, pieces):
                result[entry.name] = part.reshape(self.n_experts, *entry.shape)
        return result

    def flatten(self, named: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` for full parameter-shaped tensors."""
        core = [named[e.name].reshape(-1) for e in self._core]
        if not self.n_experts:
            return torch.cat(core)
        experts = [named[e.name].reshape(self.n_experts, -1) for e in self._expert]
        return torch.cat(core + [torch.cat(experts, dim=1).reshape(-1)])
