"""Exact RTRL gradients against backpropagation through time, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from rtrl_moe import DenseRNN, RecurrentMoE, compute_gradients

TOLERANCE = 1e-10
SEED = 1
D_IN, D_OUT = 3, 2

# (n_slots, k_read, k_write, n_experts, k_experts)
MOE_CONFIGS = {
    "overlap-s3-r2-w2": (3, 2, 2, 4, 2),
    "all-slots-all-experts": (4, 4, 4, 3, 3),
    "s8-e16-k2": (8, 2, 2, 16, 2),
    "s4-r1-w3-e8-k1": (4, 1, 3, 8, 1),
    "one-expert": (2, 1, 1, 1, 1),
    "s5-r3-w2-e6-k3": (5, 3, 2, 6, 3),
}
LAZY_CONFIGS = {
    "s8-e16-k1": (8, 2, 2, 16, 1),
    "s8-e16-k2": (8, 2, 2, 16, 2),
    "overlap-s3-r2-w2": (3, 2, 2, 4, 2),
}
RTRL_METHODS = ["rtrl-dense", "rtrl-sparse", "rtrl-lazy"]
BATCH_SIZES = [1, 3]
LENGTHS = [1, 2, 7]
LOSSES = ["last-step", "every-step"]
LAZY_LENGTH = 10
LAZY_CAPACITIES = [1, 2, 3, 8, 16]
# For these model sizes and 10 steps the automatic choice always picks
# sequential catch-up, so both modes are run explicitly.
CATCH_UP_MODES = ["tree", "sequential"]


def make_moe(config: tuple[int, int, int, int, int]) -> RecurrentMoE:
    n_slots, k_read, k_write, n_experts, k_experts = config
    torch.manual_seed(SEED)
    model = RecurrentMoE(D_IN, D_OUT, d_model=8, n_heads=2, n_slots=n_slots,
                         n_experts=n_experts, k_experts=k_experts, k_read=k_read,
                         k_write=k_write)
    return model.double()


def make_rnn() -> DenseRNN:
    torch.manual_seed(SEED)
    return DenseRNN(D_IN, D_OUT, d_hidden=6).double()


def make_batch(batch: int, steps: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 inputs and targets. Every-step targets mask some steps with -100."""
    generator = torch.Generator().manual_seed(1000 * batch + steps)
    inputs = torch.randn(batch, steps, D_IN, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, D_OUT, (batch, steps), generator=generator)
    if loss == "last-step":
        return inputs, targets[:, -1]

    samples = torch.arange(batch).unsqueeze(1)
    times = torch.arange(steps).unsqueeze(0)
    masked = (samples + times) % 3 == 1
    return inputs, targets.masked_fill(masked, -100)


def relative_error(gradient: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor]) -> float:
    """Return the global L2 norm of the difference over the L2 norm of ``reference``."""
    reference_norm = math.sqrt(sum(float((r ** 2).sum()) for r in reference.values()))
    assert reference_norm > 0, "reference gradient is zero, so the comparison is vacuous"
    difference = math.sqrt(sum(float(((gradient[name] - r) ** 2).sum())
                               for name, r in reference.items()))
    return difference / reference_norm


def assert_matches_bptt(model, inputs, targets, method, **options) -> None:
    reference = compute_gradients(model, inputs, targets, method="bptt")
    gradient = compute_gradients(model, inputs, targets, method=method, **options)

    assert gradient.keys() == reference.keys()
    error = relative_error(gradient, reference)
    assert error <= TOLERANCE, f"{method} {options}: relative error {error:.3e}"


def routing_sets(model: RecurrentMoE, inputs: torch.Tensor, field: str) -> list[tuple[int, ...]]:
    """Return the sorted ``field`` set ("write" or "experts") of sample 0 at each step."""
    state = model.initial_state(inputs.shape[0])
    sets = []
    with torch.no_grad():
        for t in range(inputs.shape[1]):
            out = model.step(inputs[:, t], state)
            state = out.state
            sets.append(tuple(sorted(getattr(out.routing, field)[0].tolist())))
    return sets


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("steps", LENGTHS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("config", MOE_CONFIGS.values(), ids=MOE_CONFIGS.keys())
@pytest.mark.parametrize("method", RTRL_METHODS)
def test_moe_matches_bptt(method, config, batch, steps, loss):
    model = make_moe(config)
    inputs, targets = make_batch(batch, steps, loss)

    assert_matches_bptt(model, inputs, targets, method)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("steps", LENGTHS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"B{b}")
def test_dense_rnn_matches_bptt(batch, steps, loss):
    model = make_rnn()
    inputs, targets = make_batch(batch, steps, loss)

    assert_matches_bptt(model, inputs, targets, "rtrl-dense")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("capacity", LAZY_CAPACITIES, ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("config", LAZY_CONFIGS.values(), ids=LAZY_CONFIGS.keys())
def test_lazy_capacity_matches_bptt(config, capacity, batch, loss):
    model = make_moe(config)
    inputs, targets = make_batch(batch, LAZY_LENGTH, loss)
    reference = compute_gradients(model, inputs, targets, method="bptt")

    for catch_up in CATCH_UP_MODES:
        gradient = compute_gradients(model, inputs, targets, method="rtrl-lazy",
                                     capacity=capacity, catch_up=catch_up)
        error = relative_error(gradient, reference)
        assert error <= TOLERANCE, f"catch_up={catch_up}: relative error {error:.3e}"


@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"B{b}")
def test_every_step_targets_mix_masked(batch):
    _, targets = make_batch(batch, 7, "every-step")

    assert (targets == -100).any()
    assert (targets != -100).any()


@pytest.mark.parametrize(
    "config",
    [c for c in MOE_CONFIGS.values() if c[2] < c[0]],
    ids=[name for name, c in MOE_CONFIGS.items() if c[2] < c[0]],
)
def test_write_sets_vary(config):
    model = make_moe(config)
    inputs, _ = make_batch(1, 7, "last-step")

    assert len(set(routing_sets(model, inputs, "write"))) > 1


@pytest.mark.parametrize(
    "config",
    [c for c in {**MOE_CONFIGS, **LAZY_CONFIGS}.values() if c[4] < c[3]],
    ids=[name for name, c in {**MOE_CONFIGS, **LAZY_CONFIGS}.items() if c[4] < c[3]],
)
def test_expert_sets_vary(config):
    model = make_moe(config)
    inputs, _ = make_batch(1, 7, "last-step")

    assert len(set(routing_sets(model, inputs, "experts"))) > 1


@pytest.mark.parametrize("method", ["bptt", *RTRL_METHODS])
def test_moe_gradient_names_and_shapes(method):
    model = make_moe(MOE_CONFIGS["s8-e16-k2"])
    inputs, targets = make_batch(3, 2, "every-step")

    gradient = compute_gradients(model, inputs, targets, method=method)

    parameters = dict(model.named_parameters())
    assert list(gradient) == list(parameters)
    for name, parameter in parameters.items():
        assert gradient[name].shape == parameter.shape, name
        assert gradient[name].dtype == parameter.dtype, name


@pytest.mark.parametrize("method", ["bptt", "rtrl-dense"])
def test_rnn_gradient_names_and_shapes(method):
    model = make_rnn()
    inputs, targets = make_batch(3, 2, "every-step")

    gradient = compute_gradients(model, inputs, targets, method=method)

    parameters = dict(model.named_parameters())
    assert list(gradient) == list(parameters)
    for name, parameter in parameters.items():
        assert gradient[name].shape == parameter.shape, name


@pytest.mark.parametrize("method", ["bptt", *RTRL_METHODS])
def test_all_masked_gives_zero(method):
    model = make_moe(MOE_CONFIGS["overlap-s3-r2-w2"])
    inputs, targets = make_batch(3, 4, "every-step")
    targets = torch.full_like(targets, -100)

    gradient = compute_gradients(model, inputs, targets, method=method)

    for name, value in gradient.items():
        assert torch.count_nonzero(value) == 0, name


def test_gradients_leave_grad_untouched():
    model = make_moe(MOE_CONFIGS["s8-e16-k2"])
    inputs, targets = make_batch(3, 3, "every-step")

    for method in ["bptt", *RTRL_METHODS]:
        compute_gradients(model, inputs, targets, method=method)

        for name, parameter in model.named_parameters():
            assert parameter.grad is None, f"{method} set .grad of {name}"
