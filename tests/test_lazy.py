"""Deferred expert updates of rtrl-lazy, and NonFiniteError from every method."""

from __future__ import annotations

import math

import pytest
import torch

from rtrl_moe import DenseRNN, NonFiniteError, RecurrentMoE, compute_gradients, make_engine

TOLERANCE = 1e-10
D_IN, D_OUT = 3, 2
STEPS = 12
METHODS = ["bptt", "rtrl-dense", "rtrl-sparse", "rtrl-lazy"]
CATCH_UP_MODES = ["tree", "sequential", None]


def make_moe(n_experts: int, k_experts: int = 1, seed: int = 1) -> RecurrentMoE:
    torch.manual_seed(seed)
    model = RecurrentMoE(D_IN, D_OUT, d_model=8, n_heads=2, n_slots=4, n_experts=n_experts,
                         k_experts=k_experts, k_read=2, k_write=2)
    return model.double()


def make_batch(batch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(batch, steps, D_IN, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, D_OUT, (batch, steps), generator=generator)
    return inputs, targets


def relative_error(gradient: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor]) -> float:
    reference_norm = math.sqrt(sum(float((r ** 2).sum()) for r in reference.values()))
    assert reference_norm > 0, "reference gradient is zero, so the comparison is vacuous"
    difference = math.sqrt(sum(float(((gradient[name] - r) ** 2).sum())
                               for name, r in reference.items()))
    return difference / reference_norm


def run_lazy(model, inputs, targets, **options):
    """Run rtrl-lazy step by step and return the engine, gradient, expert sets and sync steps."""
    engine = make_engine(model, "rtrl-lazy", **options)
    engine.begin(inputs.shape[0])
    active = []
    synced_until = []
    for t in range(inputs.shape[1]):
        with torch.no_grad():
            routing = model.step(inputs[:, t], engine.state).routing
        active.append(set(routing.experts.unique().tolist()))
        engine.step(inputs[:, t], targets[:, t])
        synced_until.append(list(engine.synced_until))
    return engine, engine.take_gradients(), active, synced_until


def catch_up_options(catch_up: str | None, capacity: int | None) -> dict:
    options = {}
    if catch_up is not None:
        options["catch_up"] = catch_up
    if capacity is not None:
        options["capacity"] = capacity
    return options


@pytest.mark.parametrize("catch_up", CATCH_UP_MODES, ids=lambda m: m or "auto")
@pytest.mark.parametrize("n_experts", [8, 16], ids=lambda e: f"E{e}")
def test_dormant_experts_deferred(n_experts, catch_up):
    model = make_moe(n_experts)
    inputs, targets = make_batch(1, STEPS)

    engine, gradient, active, _ = run_lazy(model, inputs, targets,
                                           **catch_up_options(catch_up, 2 * STEPS))

    stats = engine.stats
    assert [s["step"] for s in stats] == list(range(STEPS))
    assert sum(s["deferred"] for s in stats) > 0
    for t, s in enumerate(stats):
        assert s["deferred"] == n_experts - len(active[t]), f"step {t}"
        assert s["expired"] == 0, f"step {t}"

    reference = compute_gradients(model, inputs, targets, method="bptt")
    assert relative_error(gradient, reference) <= TOLERANCE


@pytest.mark.parametrize("catch_up", CATCH_UP_MODES, ids=lambda m: m or "auto")
@pytest.mark.parametrize("n_experts", [8, 16], ids=lambda e: f"E{e}")
def test_experts_sync_on_return(n_experts, catch_up):
    model = make_moe(n_experts)
    inputs, targets = make_batch(1, STEPS)

    engine, _, active, _ = run_lazy(model, inputs, targets,
                                    **catch_up_options(catch_up, 2 * STEPS))

    # Without expiry an expert catches up exactly when it returns after a gap.
    returning = [0] + [len(active[t] - active[t - 1]) for t in range(1, STEPS)]
    assert [s["synced"] for s in engine.stats] == returning
    assert sum(returning) > 0, "no expert returned after a gap, so no catch-up ran"

    touches = [sum(e in chosen for chosen in active) for e in range(n_experts)]
    assert min(touches) < STEPS
    assert any(0 < count < STEPS for count in touches)

    for e in range(n_experts):
        steps = [t for t in range(STEPS) if e in active[t]]
        expected = steps[-1] + 1 if steps else 0
        assert engine.synced_until[e] == expected, f"expert {e}"


@pytest.mark.parametrize("n_experts", [8, 16], ids=lambda e: f"E{e}")
def test_tree_catch_up_queries(n_experts):
    model = make_moe(n_experts)
    inputs, targets = make_batch(1, STEPS)

    tree_engine, *_ = run_lazy(model, inputs, targets, capacity=2 * STEPS, catch_up="tree")
    sequential_engine, *_ = run_lazy(model, inputs, targets, capacity=2 * STEPS,
                                     catch_up="sequential")

    assert [s["tree_queries"] for s in tree_engine.stats] == [
        s["synced"] for s in tree_engine.stats]
    assert all(s["tree_queries"] == 0 for s in sequential_engine.stats)


@pytest.mark.parametrize("catch_up", CATCH_UP_MODES, ids=lambda m: m or "auto")
@pytest.mark.parametrize("batch", [1, 3], ids=lambda b: f"B{b}")
def test_capacity_one_expires_every_step(batch, catch_up):
    model = make_moe(8)
    inputs, targets = make_batch(batch, STEPS)

    engine, gradient, active, _ = run_lazy(model, inputs, targets,
                                           **catch_up_options(catch_up, 1))

    for t, s in enumerate(engine.stats):
        assert s["expired"] > 0, f"step {t}"
        assert s["expired"] == 8 - len(active[t]), f"step {t}"
        assert s["synced"] == 0, f"step {t}"
    reference = compute_gradients(model, inputs, targets, method="bptt")
    assert relative_error(gradient, reference) <= TOLERANCE


@pytest.mark.parametrize("capacity", [1, 2, 3, 5], ids=lambda c: f"cap{c}")
def test_pending_span_within_capacity(capacity):
    model = make_moe(16)
    inputs, targets = make_batch(1, STEPS)

    engine, gradient, _, synced_until = run_lazy(model, inputs, targets, capacity=capacity)

    for t, synced in enumerate(synced_until):
        assert max(t + 1 - s for s in synced) < capacity, f"step {t}: {synced}"
    assert sum(s["expired"] for s in engine.stats) > 0
    reference = compute_gradients(model, inputs, targets, method="bptt")
    assert relative_error(gradient, reference) <= TOLERANCE


def test_gradient_split_over_calls():
    model = make_moe(8)
    inputs, targets = make_batch(1, STEPS)
    engine = make_engine(model, "rtrl-lazy", capacity=4)
    engine.begin(1)
    dense = make_engine(model, "rtrl-dense")
    dense.begin(1)

    for t in range(STEPS):
        engine.step(inputs[:, t], targets[:, t])
        dense.step(inputs[:, t], targets[:, t])
        if t % 5 == 4:
            assert relative_error(engine.take_gradients(), dense.take_gradients()) <= TOLERANCE

    assert relative_error(engine.take_gradients(), dense.take_gradients()) <= TOLERANCE


def test_non_finite_error_is_floating_point_error():
    assert issubclass(NonFiniteError, FloatingPointError)


@pytest.mark.parametrize("method", METHODS)
def test_nan_parameter_raises(method):
    model = make_moe(8)
    model.update.weight.data[0, 0] = float("nan")
    inputs, targets = make_batch(2, 5)

    with pytest.raises(NonFiniteError, match=rf"state at step 0 of method '{method}'") as info:
        compute_gradients(model, inputs, targets, method=method)

    assert info.value.step == 0
    assert info.value.method == method
    assert info.value.what == "state"


@pytest.mark.parametrize("method", METHODS)
def test_nan_expert_raises_when_selected(method):
    model = make_moe(8)
    inputs, targets = make_batch(1, STEPS)
    _, _, active, _ = run_lazy(model, inputs, targets)
    first_use = {}
    for t, chosen in enumerate(active):
        for e in chosen:
            first_use.setdefault(e, t)
    expert, step = max(first_use.items(), key=lambda item: item[1])
    assert step > 0, "every selected expert is used at step 0"
    model.experts.weight.data[expert] = float("nan")

    with pytest.raises(NonFiniteError, match=rf"at step {step} of method '{method}'") as info:
        compute_gradients(model, inputs, targets, method=method)

    assert info.value.step == step


@pytest.mark.parametrize("method", METHODS)
def test_nan_loss_raises(method):
    model = make_moe(8)
    model.head.bias.data[0] = float("nan")
    inputs, targets = make_batch(2, 5)

    with pytest.raises(NonFiniteError, match=rf"loss at step 0 of method '{method}'"):
        compute_gradients(model, inputs, targets, method=method)


@pytest.mark.parametrize("method", ["bptt", "rtrl-dense"])
def test_rnn_nan_parameter_raises(method):
    torch.manual_seed(0)
    model = DenseRNN(D_IN, D_OUT, d_hidden=6).double()
    model.recurrent.weight.data[0, 0] = float("nan")
    inputs, targets = make_batch(2, 5)

    with pytest.raises(NonFiniteError, match=rf"step 0 of method '{method}'"):
        compute_gradients(model, inputs, targets, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_large_finite_state_accepted(method):
    model = make_moe(8)
    # Every entry of c is close to 1e308, so the new state is finite but its sum overflows.
    model.update_norm.bias.data.fill_(1e308)
    inputs, targets = make_batch(1, 1)
    with torch.no_grad():
        state = model.step(inputs[:, 0], model.initial_state(1)).state
    assert bool(torch.isfinite(state).all())

    gradient = compute_gradients(model, inputs, targets, method=method)

    for name, value in gradient.items():
        assert bool(torch.isfinite(value).all()), name
