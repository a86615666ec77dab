"""Invalid arguments raise ValueError naming the offending value."""

from __future__ import annotations

import pytest
import torch

from rtrl_moe import METHODS, DenseRNN, RecurrentMoE, compute_gradients, make_engine

D_IN, D_OUT = 3, 2
BATCH, STEPS = 2, 4


def make_moe(**overrides) -> RecurrentMoE:
    arguments = dict(d_model=8, n_heads=2, n_slots=4, n_experts=4, k_experts=2,
                     k_read=2, k_write=2)
    arguments.update(overrides)
    torch.manual_seed(0)
    return RecurrentMoE(D_IN, D_OUT, **arguments)


def make_rnn() -> DenseRNN:
    torch.manual_seed(0)
    return DenseRNN(D_IN, D_OUT, d_hidden=6)


def valid_batch() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(BATCH, STEPS, D_IN)
    targets = torch.randint(0, D_OUT, (BATCH, STEPS))
    return inputs, targets


@pytest.fixture(params=["moe", "rnn"])
def model(request):
    return make_moe() if request.param == "moe" else make_rnn()


def test_valid_batch_accepted(model):
    inputs, targets = valid_batch()

    for targets_case in [targets, targets[:, -1]]:
        gradient = compute_gradients(model, inputs, targets_case, method="bptt")
        assert gradient.keys() == dict(model.named_parameters()).keys()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "inputs, pattern",
    [
        (torch.randn(BATCH, STEPS, D_IN + 1), r"d_in=3.*got 4"),
        (torch.randn(BATCH, STEPS, D_IN - 1), r"d_in=3.*got 2"),
        (torch.randn(BATCH, D_IN), r"inputs must have shape \(batch, steps, d_in\), got \(2, 3\)"),
        (torch.randn(1, BATCH, STEPS, D_IN), r"inputs must have shape .*got \(1, 2, 4, 3\)"),
        (torch.randn(0, STEPS, D_IN), r"inputs must have batch >= 1"),
        (torch.randn(BATCH, 0, D_IN), r"inputs must have .*steps >= 1"),
    ],
    ids=["width-too-wide", "width-too-narrow", "rank-2", "rank-4", "empty-batch", "no-steps"],
)
def test_bad_input_shape_raises(method, inputs, pattern):
    model = make_moe()
    targets = torch.zeros(inputs.shape[0] if inputs.dim() == 3 else BATCH, dtype=torch.long)

    with pytest.raises(ValueError, match=pattern):
        compute_gradients(model, inputs, targets, method=method)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_raise(model, value):
    inputs, targets = valid_batch()
    inputs[1, 2, 0] = value

    with pytest.raises(ValueError, match=r"inputs must be finite, got 1 non-finite"):
        compute_gradients(model, inputs, targets, method="bptt")


def test_dtype_mismatch_raises(model):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=r"inputs dtype torch.float64 .*model dtype torch.float32"):
        compute_gradients(model, inputs.double(), targets, method="bptt")


def test_double_model_float_inputs_raise():
    model = make_moe().double()
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=r"inputs dtype torch.float32 .*model dtype torch.float64"):
        compute_gradients(model, inputs, targets, method="rtrl-sparse")


@pytest.mark.parametrize(
    "targets, pattern",
    [
        (torch.zeros(BATCH + 1, dtype=torch.long), r"targets must have shape \(2,\) or \(2, 4\).*got \(3,\)"),
        (torch.zeros(BATCH, STEPS + 1, dtype=torch.long), r"targets .*got \(2, 5\)"),
        (torch.zeros(BATCH, STEPS - 1, dtype=torch.long), r"targets .*got \(2, 3\)"),
        (torch.zeros(BATCH + 1, STEPS, dtype=torch.long), r"targets .*got \(3, 4\)"),
        (torch.zeros(BATCH, STEPS, 1, dtype=torch.long), r"targets .*got \(2, 4, 1\)"),
        (torch.tensor(0), r"targets .*got \(\)"),
    ],
    ids=["batch-1d", "length-long", "length-short", "batch-2d", "rank-3", "scalar"],
)
def test_target_shape_mismatch_raises(model, targets, pattern):
    inputs, _ = valid_batch()

    with pytest.raises(ValueError, match=pattern):
        compute_gradients(model, inputs, targets, method="bptt")


@pytest.mark.parametrize("value", [D_OUT, D_OUT + 3, -1, -5, -101],
                         ids=lambda v: f"target{v}")
@pytest.mark.parametrize("shape", ["last-step", "every-step"])
def test_target_out_of_range_raises(model, value, shape):
    inputs, targets = valid_batch()
    targets[1, 2] = value
    if shape == "last-step":
        targets = targets[:, 2]

    with pytest.raises(ValueError, match=rf"targets must be in 0\.\.1 or -100, got {value}\b"):
        compute_gradients(model, inputs, targets, method="bptt")


@pytest.mark.parametrize(
    "targets, pattern",
    [
        (torch.zeros(BATCH, STEPS), r"targets must be an integer tensor.*torch.float32"),
        (torch.zeros(BATCH, STEPS, dtype=torch.float64), r"targets .*torch.float64"),
        (torch.zeros(BATCH, STEPS, dtype=torch.bool), r"targets .*torch.bool"),
        ([[0, 1, 0, 1], [1, 0, 1, 0]], r"targets must be an integer tensor.*list"),
    ],
    ids=["float32", "float64", "bool", "list"],
)
def test_non_integer_targets_raise(model, targets, pattern):
    inputs, _ = valid_batch()

    with pytest.raises(ValueError, match=pattern):
        compute_gradients(model, inputs, targets, method="bptt")


def test_integer_target_dtypes_accepted(model):
    inputs, targets = valid_batch()
    reference = compute_gradients(model, inputs, targets, method="bptt")

    for dtype in [torch.int32, torch.int16, torch.uint8]:
        gradient = compute_gradients(model, inputs, targets.to(dtype), method="bptt")
        for name, value in reference.items():
            assert torch.equal(gradient[name], value), f"{dtype}: {name}"


@pytest.mark.parametrize("name, limit, bound", [("k_read", "n_slots", 4),
                                                ("k_write", "n_slots", 4),
                                                ("k_experts", "n_experts", 4)])
def test_top_k_out_of_range_raises(name, limit, bound):
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {name}=0"):
        make_moe(**{name: 0})
    with pytest.raises(ValueError, match=rf"{name} must be <= {limit}={bound}, got {name}={bound + 1}"):
        make_moe(**{name: bound + 1})
    with pytest.raises(ValueError, match=rf"{name} must be an integer, got 1.5"):
        make_moe(**{name: 1.5})


@pytest.mark.parametrize("name", ["k_read", "k_write", "k_experts"])
def test_top_k_bounds_accepted(name):
    assert getattr(make_moe(**{name: 1}), name) == 1
    assert getattr(make_moe(**{name: 4}), name) == 4


@pytest.mark.parametrize("name", ["d_model", "n_heads", "n_slots", "n_experts"])
def test_non_positive_size_raises(name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {name}=0"):
        make_moe(**{name: 0})


@pytest.mark.parametrize("name", ["d_in", "d_out"])
def test_moe_input_output_size_raises(name):
    arguments = {"d_in": D_IN, "d_out": D_OUT, name: 0}

    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {name}=0"):
        RecurrentMoE(**arguments, d_model=8, n_heads=2)


@pytest.mark.parametrize("name", ["d_in", "d_out", "d_hidden"])
def test_rnn_size_raises(name):
    arguments = {"d_in": D_IN, "d_out": D_OUT, "d_hidden": 6, name: 0}

    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got {name}=0"):
        DenseRNN(**arguments)


def test_heads_not_dividing_width_raises():
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads, "
                                         r"got d_model=8, n_heads=3"):
        make_moe(n_heads=3)


def test_unknown_method_raises(model):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=r"unknown method 'rtrl'; expected one of bptt"):
        compute_gradients(model, inputs, targets, method="rtrl")
    with pytest.raises(ValueError, match=r"unknown method 'BPTT'"):
        make_engine(model, "BPTT")


@pytest.mark.parametrize("method", ["rtrl-sparse", "rtrl-lazy"])
def test_sparse_method_on_rnn_raises(method):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=rf"method '{method}' needs .*RecurrentMoE, got DenseRNN"):
        compute_gradients(make_rnn(), inputs, targets, method=method)


@pytest.mark.parametrize(
    "capacity, pattern",
    [
        (0, r"capacity must be >= 1, got capacity=0"),
        (-3, r"capacity must be >= 1, got capacity=-3"),
        (2.5, r"capacity must be an integer, got 2.5"),
        (4.0, r"capacity must be an integer, got 4.0"),
        ("8", r"capacity must be an integer, got '8'"),
        (True, r"capacity must be an integer, got True"),
    ],
    ids=["zero", "negative", "fraction", "float", "string", "bool"],
)
def test_bad_capacity_raises(capacity, pattern):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=pattern):
        compute_gradients(make_moe(), inputs, targets, method="rtrl-lazy", capacity=capacity)


@pytest.mark.parametrize("method", ["bptt", "rtrl-dense", "rtrl-sparse"])
@pytest.mark.parametrize("option, value", [("capacity", 4), ("catch_up", "tree")])
def test_lazy_option_on_other_method_raises(method, option, value):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=rf"{option} applies to method 'rtrl-lazy' only, "
                                         rf"got method='{method}'"):
        compute_gradients(make_moe(), inputs, targets, method=method, **{option: value})


def test_bad_catch_up_raises():
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=r"catch_up must be one of .*got 'fast'"):
        compute_gradients(make_moe(), inputs, targets, method="rtrl-lazy", catch_up="fast")


@pytest.mark.parametrize("budget, pattern", [(0, r"memory_budget must be >= 1, got memory_budget=0"),
                                             (1.5, r"memory_budget must be an integer, got 1.5")],
                         ids=["zero", "fraction"])
def test_bad_memory_budget_raises(budget, pattern):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=pattern):
        compute_gradients(make_moe(), inputs, targets, method="rtrl-sparse", memory_budget=budget)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_raises(method):
    inputs, targets = valid_batch()

    with pytest.raises(ValueError, match=r"unknown option\(s\) capcity, window"):
        compute_gradients(make_moe(), inputs, targets, method=method, capcity=4, window=2)


def test_step_bad_state_raises():
    model = make_moe()

    with pytest.raises(ValueError, match=r"h must have shape \(batch, H=32\), got \(2, 31\)"):
        model.step(torch.randn(2, D_IN), torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, d_in=3\), got \(2, 4\)"):
        model.step(torch.randn(2, D_IN + 1), model.initial_state(2))
    with pytest.raises(ValueError, match=r"x and h must have the same batch size, got 3 and 2"):
        model.step(torch.randn(3, D_IN), model.initial_state(2))


@pytest.mark.parametrize("batch_size", [0, -1, 1.0])
def test_initial_state_bad_batch_raises(model, batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be"):
        model.initial_state(batch_size)
