"""Memory estimates against real allocations, and the budget check before allocation."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch

from rtrl_moe import (DenseRNN, MemoryBudgetError, RecurrentMoE, compute_gradients,
                      estimate_memory, make_engine)
from rtrl_moe.jacobians import moe_step_factors, state_jacobian
from rtrl_moe.tasks import RandomOneHot
from rtrl_moe.training import TrainConfig, Trainer

D_IN, D_OUT = 3, 2
BATCH = 2


def make_moe(d_model: int = 8, n_slots: int = 4, n_experts: int = 4,
             dtype: torch.dtype = torch.float64) -> RecurrentMoE:
    torch.manual_seed(0)
    model = RecurrentMoE(D_IN, D_OUT, d_model=d_model, n_heads=2, n_slots=n_slots,
                         n_experts=n_experts, k_experts=2, k_read=2, k_write=2)
    return model.to(dtype)


def make_huge_moe() -> RecurrentMoE:
    """A model with 2.2 million parameters and H = 4096: P is 135 GiB at batch size 4."""
    torch.manual_seed(0)
    return RecurrentMoE(D_IN, D_OUT, d_model=64, n_heads=2, n_slots=64, n_experts=512,
                        k_experts=2, k_read=2, k_write=2)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def first_step(engine, model):
    """Run one step of ``engine`` and return the step factors it used."""
    x = torch.randn(BATCH, D_IN, dtype=next(model.parameters()).dtype)
    state = engine.state
    out = model.step(x, state)
    engine.step(x)
    return moe_step_factors(model, engine.layout, x, state, out.routing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_estimate_matches_tensors(dtype):
    model = make_moe(dtype=dtype)
    estimate = estimate_memory(model, "rtrl-sparse", BATCH)
    engine = make_engine(model, "rtrl-sparse")
    engine.begin(BATCH)
    factors = first_step(engine, model)

    assert estimate.dtype == dtype
    assert estimate.breakdown["sensitivity"] == nbytes(engine.sensitivity)
    assert estimate.breakdown["gradient"] == nbytes(engine._gradient)
    immediate = nbytes(factors.d_update_core, factors.d_weights_core, factors.d_update_selected)
    assert estimate.breakdown["immediate Jacobians"] == immediate
    assert estimate.total_bytes == sum(estimate.breakdown.values())


def test_dense_estimate_matches_tensors():
    model = make_moe()
    estimate = estimate_memory(model, "rtrl-dense", BATCH)
    engine = make_engine(model, "rtrl-dense")
    engine.begin(BATCH)
    factors = first_step(engine, model)

    assert estimate.breakdown["sensitivity"] == nbytes(engine.sensitivity)
    assert estimate.breakdown["new sensitivity"] == nbytes(engine.sensitivity)
    assert estimate.breakdown["state Jacobian"] == nbytes(state_jacobian(model, factors).to_dense())
    full = nbytes(*engine._full_immediate(factors))
    blocks = nbytes(factors.d_update_core, factors.d_weights_core, factors.d_update_selected)
    assert estimate.breakdown["immediate Jacobians"] == full + blocks


def test_dense_rnn_estimate_matches_sensitivity():
    torch.manual_seed(0)
    model = DenseRNN(D_IN, D_OUT, d_hidden=6).double()
    estimate = estimate_memory(model, "rtrl-dense", BATCH)
    engine = make_engine(model, "rtrl-dense")
    engine.begin(BATCH)
    assert estimate.breakdown["sensitivity"] == nbytes(engine.sensitivity)
    assert estimate.breakdown["state Jacobian"] == BATCH * 6 * 6 * 8


def test_lazy_tree_estimate_within_ten_percent():
    """The tree term against the kept factors and the built leaf matrices.

    Each leaf's row-sparse J_t is built here on purpose, as a tree query or a
    stale-expert loss would. The estimate leaves out the leaves' row index
    tensors, a few percent of the total.
    """
    model = make_moe()
    capacity = 3
    estimate = estimate_memory(model, "rtrl-lazy", BATCH, capacity=capacity)
    engine = make_engine(model, "rtrl-lazy", capacity=capacity)
    engine.begin(BATCH)
    for _ in range(capacity + 2):
        engine.step(torch.randn(BATCH, D_IN, dtype=torch.float64))

    kept = 0
    for leaf in engine.tree.items():
        f = leaf.factors
        kept += nbytes(f.d_update_read, f.d_weights_write, f.update, f.weights, f.old_written)
        kept += nbytes(leaf.matrix.values)
    assert len(engine.tree) == capacity
    assert estimate.breakdown["segment tree"] == pytest.approx(kept, rel=0.1)
    assert estimate.breakdown["sensitivity"] == nbytes(engine.sensitivity)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_sensitivity_estimate_matches_rss_growth():
    """RSS growth of ``begin`` against the estimated sensitivity and gradient.

    ``begin`` allocates P with ``torch.zeros``, which writes every page, so the
    resident set grows by the size of P. A P of 100 to 300 MB is far above
    the noise of the allocator and of the interpreter, and an allocation that
    large gets fresh pages from the OS (mmap), so a 10% tolerance is robust.
    """
    model = make_moe(d_model=32, n_slots=16, n_experts=8)
    estimate = estimate_memory(model, "rtrl-sparse", BATCH)
    expected = estimate.breakdown["sensitivity"] + estimate.breakdown["gradient"]
    assert 100e6 <= expected <= 300e6, expected

    engine = make_engine(model, "rtrl-sparse")
    before = rss()
    engine.begin(BATCH)
    growth = rss() - before
    assert growth == pytest.approx(expected, rel=0.1)


def test_tiny_budget_raises_before_allocation():
    model = make_huge_moe()
    engine = make_engine(model, "rtrl-sparse", memory_budget=2**20)
    before = rss()
    with pytest.raises(MemoryBudgetError) as raised:
        engine.begin(4)

    assert engine.sensitivity is None
    assert rss() - before < 50e6
    message = str(raised.value)
    assert "rtrl-sparse needs an estimated 135" in message
    assert "memory budget of 1.00 MiB (the memory_budget setting)" in message
    assert "lower batch_size" in message
    assert "raise memory_budget" in message
    assert raised.value.budget == 2**20
    assert raised.value.estimate.breakdown["sensitivity"] > 100 * 2**30


def test_default_budget_rejects_huge_sensitivity():
    """With 64 samples P is 2.2 TB, above half of the memory of any test machine."""
    model = make_huge_moe()
    engine = make_engine(model, "rtrl-lazy")
    with pytest.raises(MemoryBudgetError, match="available host memory"):
        engine.begin(64)
    assert engine.sensitivity is None


def test_trainer_budget_setting_raises():
    model = make_huge_moe()
    task = RandomOneHot(d_in=D_IN, length=3, d_out=D_OUT)
    trainer = Trainer(model, task, TrainConfig(method="rtrl-sparse", batch_size=4,
                                               memory_budget=2**30))
    with pytest.raises(MemoryBudgetError, match="1.00 GiB"):
        trainer.run()
    assert trainer.engine.sensitivity is None


def test_compute_gradients_budget_option():
    model = make_moe()
    inputs = torch.randn(BATCH, 3, D_IN, dtype=torch.float64)
    targets = torch.randint(0, D_OUT, (BATCH, 3))
    with pytest.raises(MemoryBudgetError, match="rtrl-lazy needs an estimated"):
        compute_gradients(model, inputs, targets, method="rtrl-lazy", memory_budget=1000)

    gradients = compute_gradients(model, inputs, targets, method="bptt", memory_budget=1000)
    assert set(gradients) == {name for name, _ in model.named_parameters()}
    compute_gradients(model, inputs, targets, method="rtrl-sparse", memory_budget=2**30)


def test_bptt_estimate_is_zero():
    estimate = estimate_memory(make_moe(), "bptt", 8)
    assert estimate.total_bytes == 0
    assert estimate.breakdown == {}
    assert "no sensitivity" in str(estimate)


def test_estimate_text_uses_units():
    text = str(estimate_memory(make_huge_moe(), "rtrl-dense", 4))
    assert text.startswith("rtrl-dense at batch_size=4 in float32: ")
    assert "GiB" in text
    assert "sensitivity 134.87 GiB" in text
    small = str(estimate_memory(make_moe(), "rtrl-sparse", 1))
    assert "KiB" in small or "MiB" in small


def test_estimate_grows_with_batch_and_dtype():
    model = make_moe(dtype=torch.float32)
    single = estimate_memory(model, "rtrl-sparse", 1)
    assert estimate_memory(model, "rtrl-sparse", 2).breakdown["sensitivity"] == \
        2 * single.breakdown["sensitivity"]
    assert estimate_memory(model, "rtrl-sparse", 1, torch.float64).breakdown["sensitivity"] == \
        2 * single.breakdown["sensitivity"]


@pytest.mark.parametrize("arguments, pattern", [
    ({"method": "rtrl"}, "unknown method 'rtrl'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_size": 1.5}, "batch_size must be an integer"),
    ({"dtype": torch.int64}, "dtype must be a floating point torch.dtype"),
    ({"dtype": "float32"}, "dtype must be a floating point torch.dtype"),
    ({"capacity": 4}, "capacity applies to method 'rtrl-lazy' only"),
    ({"method": "rtrl-lazy", "capacity": 0}, "capacity must be >= 1"),
])
def test_bad_estimate_arguments(arguments, pattern):
    settings = {"method": "rtrl-sparse", "batch_size": 2, **arguments}
    with pytest.raises(ValueError, match=pattern):
        estimate_memory(make_moe(), **settings)


def test_sparse_estimate_needs_moe():
    with pytest.raises(ValueError, match="needs RecurrentMoE, got DenseRNN"):
        estimate_memory(DenseRNN(D_IN, D_OUT), "rtrl-lazy", 1)


@pytest.mark.parametrize("budget", [0, -5, 1.5, "1GB", True])
def test_bad_memory_budget(budget):
    with pytest.raises(ValueError, match="memory_budget must be"):
        make_engine(make_moe(), "rtrl-sparse", memory_budget=budget)
    with pytest.raises(ValueError, match="memory_budget must be"):
        TrainConfig(method="rtrl-sparse", memory_budget=budget)
