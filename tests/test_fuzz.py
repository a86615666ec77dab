"""Random small configurations: every method agrees with BPTT; invalid values raise ValueError."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtrl_moe import METHODS, RecurrentMoE, compute_gradients
from rtrl_moe.tasks import Haystack
from rtrl_moe.training import TrainConfig, Trainer, train

TOLERANCE = 1e-10
D_IN, D_OUT = 3, 4
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARITY = settings(FUZZ, max_examples=30)


@st.composite
def model_configs(draw) -> dict:
    """Draw valid RecurrentMoE arguments: every k within its range, n_heads dividing d_model."""
    d_model = draw(st.sampled_from([4, 8]))
    n_heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if d_model % h == 0]))
    n_slots = draw(st.integers(1, 4))
    n_experts = draw(st.integers(1, 5))
    return {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_slots": n_slots,
        "n_experts": n_experts,
        "k_experts": draw(st.integers(1, n_experts)),
        "k_read": draw(st.integers(1, n_slots)),
        "k_write": draw(st.integers(1, n_slots)),
    }


@st.composite
def problems(draw) -> tuple[RecurrentMoE, torch.Tensor, torch.Tensor, int]:
    """Draw a float64 model, inputs, targets (a loss at the last step at least) and a capacity."""
    config = draw(model_configs())
    batch, steps = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = RecurrentMoE(D_IN, D_OUT, **config).double()

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, steps, D_IN, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, D_OUT, (batch, steps), generator=generator)
    masked = torch.rand(batch, steps, generator=generator) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    masked[:, -1] = False
    targets = targets.masked_fill(masked, -100)
    if draw(st.booleans()):
        targets = targets[:, -1]
    return model, inputs, targets, draw(st.integers(1, 6))


def relative_error(gradient: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    norm = math.sqrt(sum(float((r ** 2).sum()) for r in reference.values()))
    difference = math.sqrt(sum(float(((gradient[n] - r) ** 2).sum()) for n, r in reference.items()))
    return difference / norm if norm > 0 else difference


@PARITY
@given(problem=problems())
def test_every_method_matches_bptt(problem):
    model, inputs, targets, capacity = problem
    reference = compute_gradients(model, inputs, targets, method="bptt")
    shapes = {name: p.shape for name, p in model.named_parameters()}

    for method in METHODS:
        options = {"capacity": capacity} if method == "rtrl-lazy" else {}
        gradient = compute_gradients(model, inputs, targets, method=method, **options)
        assert {n: g.shape for n, g in gradient.items()} == shapes, method
        for name, g in gradient.items():
            assert bool(torch.isfinite(g).all()), f"{method}: {name} is not finite"
        error = relative_error(gradient, reference)
        assert error <= TOLERANCE, f"{method} (capacity {capacity}): relative error {error:.2e}"


def small_model() -> RecurrentMoE:
    torch.manual_seed(0)
    return RecurrentMoE(D_IN, D_OUT, d_model=4, n_heads=2, n_slots=3, n_experts=3, k_experts=2,
                        k_read=2, k_write=2).double()


@FUZZ
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4))
def test_bad_input_shape_raises(shape):
    valid = len(shape) == 3 and shape[0] >= 1 and shape[1] >= 1 and shape[2] == D_IN
    if valid:
        shape[2] = D_IN + 1
    inputs = torch.zeros(tuple(shape), dtype=torch.float64)
    targets = torch.zeros(max(shape[0], 1) if shape else 1, dtype=torch.long)
    with pytest.raises(ValueError):
        compute_gradients(small_model(), inputs, targets, method="rtrl-sparse")


@FUZZ
@given(n_slots=st.integers(-2, 4), n_experts=st.integers(-2, 5), k_read=st.integers(-2, 6),
       k_write=st.integers(-2, 6), k_experts=st.integers(-2, 7))
def test_out_of_range_ks_raise(n_slots, n_experts, k_read, k_write, k_experts):
    valid = (n_slots >= 1 and n_experts >= 1 and 1 <= k_read <= n_slots
             and 1 <= k_write <= n_slots and 1 <= k_experts <= n_experts)
    arguments = dict(d_model=4, n_heads=2, n_slots=n_slots, n_experts=n_experts,
                     k_experts=k_experts, k_read=k_read, k_write=k_write)
    if valid:
        RecurrentMoE(D_IN, D_OUT, **arguments)
        return
    with pytest.raises(ValueError):
        RecurrentMoE(D_IN, D_OUT, **arguments)


BAD_TARGETS = st.one_of(
    st.integers(D_OUT, 50).map(lambda v: torch.full((2, 3), v)),
    st.integers(-99, -1).map(lambda v: torch.full((2, 3), v)),
    st.integers(-1000, -101).map(lambda v: torch.full((2,), v)),
    st.tuples(st.integers(0, 4), st.integers(0, 4)).filter(lambda s: s not in [(2, 3)])
    .map(lambda s: torch.zeros(s, dtype=torch.long)),
    st.just(torch.zeros(2, 3)),
    st.just(torch.zeros(2, 3, dtype=torch.bool)),
    st.just([0, 1]),
)


@FUZZ
@given(targets=BAD_TARGETS, method=st.sampled_from(METHODS))
def test_bad_targets_raise(targets, method):
    inputs = torch.zeros(2, 3, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError):
        compute_gradients(small_model(), inputs, targets, method=method)


@FUZZ
@given(method=st.text(max_size=12).filter(lambda m: m not in METHODS))
def test_unknown_method_raises(method):
    inputs, targets = torch.zeros(1, 2, D_IN, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError):
        compute_gradients(small_model(), inputs, targets, method=method)


@FUZZ
@given(option=st.text(min_size=1, max_size=12).filter(
    lambda o: o not in ("capacity", "catch_up", "memory_budget", "model", "inputs", "targets",
                        "method")),
    method=st.sampled_from(METHODS))
def test_unknown_option_raises(option, method):
    inputs, targets = torch.zeros(1, 2, D_IN, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError):
        compute_gradients(small_model(), inputs, targets, method=method, **{option: 1})


BAD_CONFIG_VALUES = {
    "method": st.one_of(st.text(max_size=8).filter(lambda m: m not in METHODS), st.integers()),
    "sequences": st.one_of(st.integers(max_value=0), st.floats(), st.just("10")),
    "batch_size": st.one_of(st.integers(max_value=0), st.floats(), st.just(None)),
    "lr": st.one_of(st.floats(max_value=0), st.just(float("nan")), st.just(float("inf")),
                    st.just("0.1"), st.just(True)),
    "clip_norm": st.one_of(st.floats(max_value=0), st.just(float("nan")), st.just("1")),
    "update_every": st.one_of(st.integers(max_value=0), st.floats(0.5, 10)),
    "capacity": st.one_of(st.integers(max_value=0), st.just(2.0)),
    "seed": st.one_of(st.integers(max_value=-1), st.floats(), st.just("0")),
    "memory_budget": st.one_of(st.integers(max_value=0), st.floats(), st.just("1GB")),
    "on_nonfinite": st.one_of(st.text(max_size=8).filter(lambda v: v not in ("raise", "skip")),
                              st.just(None)),
}


@FUZZ
@given(data=st.data(), field=st.sampled_from(sorted(BAD_CONFIG_VALUES)))
def test_bad_config_value_raises(data, field):
    value = data.draw(BAD_CONFIG_VALUES[field])
    settings = {"method": "rtrl-lazy", field: value}
    with pytest.raises(ValueError, match=field if field != "method" else "method"):
        TrainConfig(**settings)


@pytest.mark.parametrize("method", ["bptt", "rtrl-dense", "rtrl-sparse"])
def test_capacity_for_other_methods_raises(method):
    with pytest.raises(ValueError, match="capacity applies to method 'rtrl-lazy' only"):
        TrainConfig(method=method, capacity=4)


def haystack_model() -> tuple[RecurrentMoE, Haystack]:
    task = Haystack(length=3, n_values=2, n_distractors=1)
    torch.manual_seed(0)
    return RecurrentMoE(task.d_in, task.d_out, d_model=4, n_heads=2, n_slots=2, n_experts=2,
                        k_experts=1, k_read=1, k_write=1), task


@pytest.mark.parametrize("arguments, pattern", [
    ({"optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer"),
    ({"callbacks": [3]}, "callbacks must be an iterable of callables"),
    ({"callbacks": print}, "callbacks must be an iterable of callables"),
    ({"config": {"method": "bptt"}}, "config must be a TrainConfig"),
    ({"task": Haystack(length=3, n_values=2, n_distractors=2)}, "task d_in=6 does not match"),
    ({"task": "haystack"}, "task must have d_in and sample"),
    ({"model": torch.nn.Linear(2, 2)}, "model must be a RecurrentMoE or DenseRNN"),
])
def test_bad_trainer_arguments(arguments, pattern):
    model, task = haystack_model()
    values = {"model": model, "task": task, "config": TrainConfig(sequences=1), **arguments}
    with pytest.raises(ValueError, match=pattern):
        Trainer(**values)


def test_unknown_train_setting_raises():
    model, task = haystack_model()
    with pytest.raises(ValueError, match="unknown setting"):
        train(model, task, sequences=1, windw=3)
