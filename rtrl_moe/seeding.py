"""One seeding helper for every random number generator the project uses."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from rtrl_moe._checks import check_int


def set_seed(seed: int, *, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch, turn on deterministic algorithms, return a data generator.

    The returned ``torch.Generator`` (CPU, seeded with ``seed``) is what task
    samplers should draw from, so that data and model initialisation use
    separate streams and a change in one does not shift the other.
    """
    check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Required by cuBLAS for deterministic results; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed + 1)
