"""Repeated runs with the same seed give bitwise equal gradients on CPU."""

from __future__ import annotations

import pytest
import torch

from rtrl_moe import DenseRNN, RecurrentMoE, compute_gradients

D_IN, D_OUT = 3, 2
BATCH, STEPS = 3, 6
CASES = [
    ("bptt", {}),
    ("rtrl-dense", {}),
    ("rtrl-sparse", {}),
    ("rtrl-lazy", {}),
    ("rtrl-lazy", {"capacity": 2, "catch_up": "tree"}),
    ("rtrl-lazy", {"capacity": 2, "catch_up": "sequential"}),
]
CASE_IDS = ["bptt", "rtrl-dense", "rtrl-sparse", "rtrl-lazy", "lazy-tree-cap2",
            "lazy-sequential-cap2"]


def make_setup(seed: int, dtype: torch.dtype):
    """Seed the global generator, then build a model and a batch from it."""
    torch.manual_seed(seed)
    model = RecurrentMoE(D_IN, D_OUT, d_model=8, n_heads=2, n_slots=4, n_experts=6,
                         k_experts=2, k_read=2, k_write=2).to(dtype)
    inputs = torch.randn(BATCH, STEPS, D_IN, dtype=dtype)
    targets = torch.randint(0, D_OUT, (BATCH, STEPS))
    targets[0, 1] = -100
    return model, inputs, targets


def assert_bitwise_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("method, options", CASES, ids=CASE_IDS)
def test_same_seed_same_gradient(method, options, dtype):
    model, inputs, targets = make_setup(3, dtype)
    first = compute_gradients(model, inputs, targets, method=method, **options)
    model, inputs, targets = make_setup(3, dtype)
    second = compute_gradients(model, inputs, targets, method=method, **options)

    assert_bitwise_equal(first, second)
    assert any(torch.count_nonzero(g) > 0 for g in first.values())


@pytest.mark.parametrize("method, options", CASES, ids=CASE_IDS)
def test_repeated_call_same_gradient(method, options):
    model, inputs, targets = make_setup(4, torch.float32)

    first = compute_gradients(model, inputs, targets, method=method, **options)
    second = compute_gradients(model, inputs, targets, method=method, **options)

    assert_bitwise_equal(first, second)


@pytest.mark.parametrize("method", ["bptt", "rtrl-dense"])
def test_rnn_same_seed_same_gradient(method):
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        model = DenseRNN(D_IN, D_OUT, d_hidden=6)
        inputs = torch.randn(BATCH, STEPS, D_IN)
        targets = torch.randint(0, D_OUT, (BATCH, STEPS))
        results.append(compute_gradients(model, inputs, targets, method=method))

    assert_bitwise_equal(*results)


def test_different_seed_different_gradient():
    model, inputs, targets = make_setup(3, torch.float32)
    first = compute_gradients(model, inputs, targets, method="rtrl-sparse")
    model, inputs, targets = make_setup(4, torch.float32)
    second = compute_gradients(model, inputs, targets, method="rtrl-sparse")

    assert any(not torch.equal(first[name], second[name]) for name in first)
