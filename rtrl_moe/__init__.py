"""Exact sparse real-time recurrent learning for recurrent mixtures of experts."""

from rtrl_moe._checks import NonFiniteError
from rtrl_moe.gradients import METHODS, compute_gradients, make_engine
from rtrl_moe.jacobians import RowSparseJacobian
from rtrl_moe.models import DenseRNN, RecurrentMoE, Routing, StepOutput
from rtrl_moe.tree import CircularSegmentTree

__all__ = [
    "METHODS",
    "CircularSegmentTree",
    "DenseRNN",
    "NonFiniteError",
    "RecurrentMoE",
    "Routing",
    "RowSparseJacobian",
    "StepOutput",
    "compute_gradients",
    "make_engine",
]
