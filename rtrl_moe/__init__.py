"""Exact sparse real-time recurrent learning for recurrent mixtures of experts."""

from rtrl_moe._checks import NonFiniteError
from rtrl_moe.checkpoint import CheckpointError
from rtrl_moe.gradients import METHODS, compute_gradients, make_engine
from rtrl_moe.jacobians import RowSparseJacobian
from rtrl_moe.memory import MemoryBudgetError, MemoryEstimate, estimate_memory
from rtrl_moe.models import DenseRNN, RecurrentMoE, Routing, StepOutput
from rtrl_moe.tree import CircularSegmentTree

__all__ = [
    "METHODS",
    "CheckpointError",
    "CircularSegmentTree",
    "DenseRNN",
    "MemoryBudgetError",
    "MemoryEstimate",
    "NonFiniteError",
    "RecurrentMoE",
    "Routing",
    "RowSparseJacobian",
    "StepOutput",
    "compute_gradients",
    "estimate_memory",
    "make_engine",
]
