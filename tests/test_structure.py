"""Sparsity of one RecurrentMoE step, checked against autograd Jacobians in float64."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from rtrl_moe import RecurrentMoE
from rtrl_moe.jacobians import moe_step_factors, state_jacobian
from rtrl_moe.layout import ParameterLayout

D_IN, D_OUT, D_MODEL = 3, 2, 8
BATCH = 3
SEEDS = [0, 1, 2, 3]

# (n_slots, k_read, k_write, n_experts, k_experts)
CONFIGS = {
    "overlap-s3-r2-w2": (3, 2, 2, 4, 2),
    "s6-r2-w2-e8-k2": (6, 2, 2, 8, 2),
    "s5-r1-w3-e6-k3": (5, 1, 3, 6, 3),
    "all-slots": (4, 4, 4, 3, 3),
}


def make_case(config, seed: int) -> tuple[RecurrentMoE, torch.Tensor, torch.Tensor]:
    """Return a float64 model, inputs (B, d_in) and a random state (B, H)."""
    n_slots, k_read, k_write, n_experts, k_experts = config
    torch.manual_seed(seed)
    model = RecurrentMoE(D_IN, D_OUT, d_model=D_MODEL, n_heads=2, n_slots=n_slots,
                         n_experts=n_experts, k_experts=k_experts, k_read=k_read,
                         k_write=k_write).double()
    x = torch.randn(BATCH, D_IN, dtype=torch.float64)
    h = torch.randn(BATCH, model.state_size, dtype=torch.float64)
    return model, x, h


def slot_rows(slots: torch.Tensor) -> torch.Tensor:
    """Return the indices of the flattened state that belong to the given slots."""
    offsets = torch.arange(D_MODEL)
    return (slots.unsqueeze(-1) * D_MODEL + offsets).reshape(-1)


def autograd_jacobians(model: RecurrentMoE, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Return dh_{t+1}/dh_t per sample (B, H, H), with the routing held at its chosen sets."""
    jacobians = []
    for b in range(h.shape[0]):
        def next_state(state, b=b):
            return model.step(x[b:b + 1], state).state[0]

        jacobians.append(jacobian(next_state, h[b:b + 1])[:, 0])
    return torch.stack(jacobians)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_unwritten_rows_are_identity(config, seed):
    model, x, h = make_case(config, seed)
    routing = model.step(x, h).routing
    dense = autograd_jacobians(model, x, h)
    eye = torch.eye(model.state_size, dtype=torch.float64)

    for b in range(BATCH):
        unwritten = torch.ones(model.state_size, dtype=torch.bool)
        unwritten[slot_rows(routing.write[b])] = False

        assert torch.equal(dense[b][unwritten], eye[unwritten]), f"sample {b}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_written_rows_use_read_and_write_columns(config, seed):
    model, x, h = make_case(config, seed)
    routing = model.step(x, h).routing
    dense = autograd_jacobians(model, x, h)

    for b in range(BATCH):
        written = slot_rows(routing.write[b])
        used = torch.zeros(model.state_size, dtype=torch.bool)
        used[slot_rows(routing.read[b])] = True
        used[written] = True
        block = dense[b][written]

        assert torch.count_nonzero(block[:, ~used]) == 0, f"sample {b}"
        assert torch.count_nonzero(block[:, used]) > 0, f"sample {b}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_read_columns_reach_written_rows(config, seed):
    model, x, h = make_case(config, seed)
    routing = model.step(x, h).routing
    dense = autograd_jacobians(model, x, h)

    for b in range(BATCH):
        written = slot_rows(routing.write[b])
        for slot in routing.read[b]:
            columns = slot_rows(slot.reshape(1))
            assert torch.count_nonzero(dense[b][written][:, columns]) > 0, f"sample {b}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_jacobian_matches_autograd(config, seed):
    model, x, h = make_case(config, seed)
    routing = model.step(x, h).routing
    dense = autograd_jacobians(model, x, h)

    factors = moe_step_factors(model, ParameterLayout(model), x, h, routing)
    assembled = state_jacobian(model, factors)

    assert assembled.rows.shape == (BATCH, model.k_write * D_MODEL)
    assert torch.allclose(assembled.to_dense(), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS.values() if c[4] < c[3]],
    ids=[name for name, c in CONFIGS.items() if c[4] < c[3]],
)
def test_unselected_experts_zero_gradient(config, seed):
    model, x, h = make_case(config, seed)
    out = model.step(x, h)
    names = ["gate_weight", "gate_bias", "weight", "bias"]
    parameters = [getattr(model.experts, name) for name in names]

    # A plain sum would not see the experts, because with the initial LayerNorm
    # weight of ones the entries of the normalised update c sum to a constant.
    weights = torch.randn(model.state_size, dtype=torch.float64)

    for b in range(BATCH):
        gradients = torch.autograd.grad(out.state[b] @ weights, parameters, retain_graph=True)

        selected = torch.zeros(model.n_experts, dtype=torch.bool)
        selected[out.routing.experts[b]] = True
        for name, gradient in zip(names, gradients):
            assert torch.count_nonzero(gradient[~selected]) == 0, f"{name}, sample {b}"
        assert torch.count_nonzero(gradients[2][selected]) > 0, f"sample {b}"
