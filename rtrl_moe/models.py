"""Recurrent models with a common ``initial_state`` / ``step`` interface.

``RecurrentMoE`` keeps its state as ``n_slots`` memory slots of width ``d_model``,
flattened to ``H = n_slots * d_model`` numbers per sample. One step reads a top-k
set of slots, mixes them with the input, routes through a top-k set of experts
and writes a top-k set of slots. Unwritten slots are copied unchanged and every
written slot is a function of the read set and the write set only, which is what
makes the state Jacobian structurally sparse.

``DenseRNN`` is the tanh RNN baseline with the same interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtrl_moe._checks import check_int, check_step_inputs

EXPERT_PREFIX = "experts."


@dataclass(frozen=True)
class Routing:
    """Top-k choices of one step, one row per sample (long tensors)."""

    read: Tensor
    write: Tensor
    experts: Tensor


@dataclass(frozen=True)
class StepOutput:
    """Result of one recurrent step."""

    logits: Tensor
    state: Tensor
    routing: Routing | None


@dataclass(frozen=True)
class WriteFactors:
    """The two quantities every written slot is built from.

    ``update`` is the shared normalised update vector c (``..., d_model``) and
    ``weights`` the write weights beta over the write set (``..., k_write``).
    Written slot j becomes ``(1 - beta_j) * old_j + beta_j * c``.
    """

    update: Tensor
    weights: Tensor


def _gather_slots(slots: Tensor, index: Tensor) -> Tensor:
    """Gather slots (``..., S, D``) at ``index`` (``..., k``) into ``..., k, D``."""
    expanded = index.unsqueeze(-1).expand(*index.shape, slots.shape[-1])
    return torch.gather(slots, -2, expanded)


class RecurrentMoE(nn.Module):
    """Slot-memory recurrent mixture of experts with top-k read, write and experts.

    One step maps ``(h_t, x_t)`` to ``(h_{t+1}, logits_t)``:

    1. read gate: a linear score per slot, top-``k_read`` slots form the read set R,
       weighted by a softmax over the selected scores only;
    2. the weighted read slots and the embedded input attend over each other,
       then pass a feed-forward block, and the tokens are mean-pooled into z.
       The attention is written with einsum and softmax, so it works under
       ``torch.func.vmap``;
    3. a top-``k_experts`` gate over the experts, softmax over the selected
       logits; each selected expert adds ``ReLU(W_e z + b_e)`` to z;
    4. write gate: a linear score of each layer-normalised slot, top-``k_write``
       slots form the write set W with softmax weights beta over the selected scores;
    5. c = LayerNorm(U z) and slot j in W becomes ``(1 - beta_j) h_j + beta_j c``;
    6. logits = a linear head of ``[x_t, h_{t+1}]``.

    The gate row of expert e (``experts.gate_weight[e]``, ``experts.gate_bias[e]``)
    only enters through the softmax over selected experts, so all parameters of
    an unselected expert have an exactly zero immediate Jacobian.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        d_model: int = 64,
        n_heads: int = 2,
        n_slots: int = 8,
        n_experts: int = 16,
        k_experts: int = 2,
        k_read: int = 2,
        k_write: int = 2,
    ) -> None:
        super().__init__()
        for name, value in [("d_in", d_in), ("d_out", d_out), ("d_model", d_model),
                            ("n_heads", n_heads), ("n_slots", n_slots), ("n_experts", n_experts)]:
            check_int(name, value, minimum=1)
        check_int("k_read", k_read, minimum=1, maximum=n_slots, maximum_name="n_slots")
        check_int("k_write", k_write, minimum=1, maximum=n_slots, maximum_name="n_slots")
        check_int("k_experts", k_experts, minimum=1, maximum=n_experts, maximum_name="n_experts")
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )

        self.d_in, self.d_out, self.d_model, self.n_heads = d_in, d_out, d_model, n_heads
        self.n_slots, self.n_experts = n_slots, n_experts
        self.k_read, self.k_write, self.k_experts = k_read, k_write, k_experts
        self.state_size = n_slots * d_model

        self.read_score = nn.Linear(d_model, 1)
        self.input_embed = nn.Linear(d_in, d_model)
        self.attn_qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn_in = nn.Linear(d_model, 2 * d_model)
        self.ffn_out = nn.Linear(2 * d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.write_norm = nn.LayerNorm(d_model)
        self.write_score = nn.Linear(d_model, 1)
        self.update = nn.Linear(d_model, d_model)
        self.update_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_in + self.state_size, d_out)
        self.experts = ExpertBank(n_experts, d_model)

        initial = torch.randn(n_slots, d_model, generator=torch.Generator().manual_seed(0))
        self.register_buffer("initial_slots", initial)

    def config(self) -> dict[str, int]:
        """Return the constructor arguments, so ``RecurrentMoE(**model.config())`` rebuilds it."""
        return {"d_in": self.d_in, "d_out": self.d_out, "d_model": self.d_model,
                "n_heads": self.n_heads, "n_slots": self.n_slots, "n_experts": self.n_experts,
                "k_experts": self.k_experts, "k_read": self.k_read, "k_write": self.k_write}

    def initial_state(self, batch_size: int) -> Tensor:
        """Return the fixed initial state, one copy per sample (``B, H``)."""
        check_int("batch_size", batch_size, minimum=1)
        flat = self.initial_slots.reshape(1, self.state_size)
        return flat.expand(batch_size, self.state_size).clone()

    def core_parameters(self) -> dict[str, Tensor]:
        """Return the shared parameters (everything except the expert bank) by name."""
        return {
            name: p for name, p in self.named_parameters() if not name.startswith(EXPERT_PREFIX)
        }

    def step(self, x: Tensor, h: Tensor) -> StepOutput:
        """Advance the state by one step for a batch (``x``: B x d_in, ``h``: B x H)."""
        check_step_inputs(self, x, h)
        slots = h.reshape(h.shape[0], self.n_slots, self.d_model)
        read, write = self.route_slots(slots)
        read_slots = _gather_slots(slots, read)
        write_slots = _gather_slots(slots, write)

        core = self.core_parameters()
        pooled = self.read_and_mix(core, read_slots, x)
        experts = self.route_experts(pooled)
        selected = self.experts.select(experts)
        factors = WriteFactors(self.expert_update(core, selected, pooled),
                               self.write_weights(core, write_slots))

        new_state = self.apply_write(h, write, write_slots, factors)
        logits = self.output(core, x, new_state)
        return StepOutput(logits, new_state, Routing(read, write, experts))

    @torch.no_grad()
    def route_slots(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Return the read set and the write set (``B, k``) chosen from the slots."""
        read_scores = F.linear(slots, self.read_score.weight, self.read_score.bias).squeeze(-1)
        normed = F.layer_norm(slots, (self.d_model,), self.write_norm.weight, self.write_norm.bias)
        write_scores = F.linear(normed, self.write_score.weight, self.write_score.bias).squeeze(-1)
        read = torch.topk(read_scores, self.k_read, dim=-1).indices
        write = torch.topk(write_scores, self.k_write, dim=-1).indices
        return read, write

    @torch.no_grad()
    def route_experts(self, pooled: Tensor) -> Tensor:
        """Return the selected experts (``B, k_experts``) for the pooled read content."""
        logits = F.linear(pooled, self.experts.gate_weight, self.experts.gate_bias)
        return torch.topk(logits, self.k_experts, dim=-1).indices

    def read_and_mix(self, core: dict[str, Tensor], read_slots: Tensor, x: Tensor) -> Tensor:
        """Weight the read slots, attend over them and the input, and mean-pool (``..., D``)."""
        scores = F.linear(read_slots, core["read_score.weight"], core["read_score.bias"])
        weights = torch.softmax(scores.squeeze(-1), dim=-1)
        embedded = F.linear(x, core["input_embed.weight"], core["input_embed.bias"])
        tokens = torch.cat([weights.unsqueeze(-1) * read_slots, embedded.unsqueeze(-2)], dim=-2)

        attended = tokens + F.linear(self._attention(core, tokens),
                                     core["attn_out.weight"], core["attn_out.bias"])
        tokens = F.layer_norm(attended, (self.d_model,), core["attn_norm.weight"],
                              core["attn_norm.bias"])

        hidden = F.gelu(F.linear(tokens, core["ffn_in.weight"], core["ffn_in.bias"]))
        mixed = tokens + F.linear(hidden, core["ffn_out.weight"], core["ffn_out.bias"])
        tokens = F.layer_norm(mixed, (self.d_model,), core["ffn_norm.weight"], core["ffn_norm.bias"])
        return tokens.mean(dim=-2)

    def _attention(self, core: dict[str, Tensor], tokens: Tensor) -> Tensor:
        head_dim = self.d_model // self.n_heads
        qkv = F.linear(tokens, core["attn_qkv.weight"], core["attn_qkv.bias"])
        q, k, v = qkv.reshape(*tokens.shape[:-1], 3, self.n_heads, head_dim).unbind(-3)
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(head_dim)
        out = torch.einsum("...hqk,...khd->...qhd", torch.softmax(scores, dim=-1), v)
        return out.reshape(tokens.shape)

    def update_vector(self, core: dict[str, Tensor], selected: dict[str, Tensor],
                      read_slots: Tensor, x: Tensor) -> Tensor:
        """Compute c from the read slots, the input and the selected experts (``..., D``).

        ``selected`` contains the gathered parameters of the chosen experts (leading
        dimension ``k_experts`` after the batch dimensions), so c depends on no
        other expert and on no slot outside the read set.
        """
        return self.expert_update(core, selected, self.read_and_mix(core, read_slots, x))

    def expert_update(self, core: dict[str, Tensor], selected: dict[str, Tensor],
                      pooled: Tensor) -> Tensor:
        """Apply the selected experts to the pooled read content and normalise into c."""
        expert_logits = torch.einsum("...kd,...d->...k", selected["gate_weight"], pooled)
        expert_weights = torch.softmax(expert_logits + selected["gate_bias"], dim=-1)
        expert_out = torch.einsum("...kij,...j->...ki", selected["weight"], pooled)
        expert_out = torch.relu(expert_out + selected["bias"])
        pooled = pooled + torch.einsum("...k,...ki->...i", expert_weights, expert_out)

        update = F.linear(pooled, core["update.weight"], core["update.bias"])
        return F.layer_norm(update, (self.d_model,), core["update_norm.weight"],
                            core["update_norm.bias"])

    def write_weights(self, core: dict[str, Tensor], write_slots: Tensor) -> Tensor:
        """Compute beta, the softmax over the write scores of the write set (``..., k_write``)."""
        normed = F.layer_norm(write_slots, (self.d_model,), core["write_norm.weight"],
                              core["write_norm.bias"])
        scores = F.linear(normed, core["write_score.weight"], core["write_score.bias"])
        return torch.softmax(scores.squeeze(-1), dim=-1)

    def apply_write(self, h: Tensor, write: Tensor, write_slots: Tensor,
                    factors: WriteFactors) -> Tensor:
        """Blend the written slots towards c and copy every other slot (``B, H``)."""
        beta = factors.weights.unsqueeze(-1)
        written = (1 - beta) * write_slots + beta * factors.update.unsqueeze(-2)
        slots = h.reshape(h.shape[0], self.n_slots, self.d_model)
        index = write.unsqueeze(-1).expand_as(written)
        return slots.scatter(-2, index, written).reshape(h.shape)

    def output(self, core: dict[str, Tensor], x: Tensor, state: Tensor) -> Tensor:
        """Return the logits read from the input and the new state."""
        return F.linear(torch.cat([x, state], dim=-1), core["head.weight"], core["head.bias"])


class ExpertBank(nn.Module):
    """Parameters of all experts, stacked along a leading expert dimension.

    Expert e owns ``gate_weight[e]``, ``gate_bias[e]``, ``weight[e]`` and ``bias[e]``.
    """

    def __init__(self, n_experts: int, d_model: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(d_model)
        self.gate_weight = nn.Parameter(torch.empty(n_experts, d_model).uniform_(-bound, bound))
        self.gate_bias = nn.Parameter(torch.zeros(n_experts))
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, d_model).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_experts, d_model).uniform_(-bound, bound))

    def parameter_dict(self) -> dict[str, Tensor]:
        """Return the stacked expert parameters by short name."""
        return {"gate_weight": self.gate_weight, "gate_bias": self.gate_bias,
                "weight": self.weight, "bias": self.bias}

    def select(self, experts: Tensor) -> dict[str, Tensor]:
        """Gather the parameters of the chosen experts (``B, k`` indices)."""
        return {name: p[experts] for name, p in self.parameter_dict().items()}


class DenseRNN(nn.Module):
    """Tanh RNN baseline: ``h' = tanh(W_ih x + W_hh h + b)``, logits = head(h')."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int = 64) -> None:
        super().__init__()
        for name, value in [("d_in", d_in), ("d_out", d_out), ("d_hidden", d_hidden)]:
            check_int(name, value, minimum=1)
        self.d_in, self.d_out, self.d_hidden = d_in, d_out, d_hidden
        self.state_size = d_hidden
        self.input_map = nn.Linear(d_in, d_hidden)
        self.recurrent = nn.Linear(d_hidden, d_hidden, bias=False)
        self.head = nn.Linear(d_hidden, d_out)

    def config(self) -> dict[str, int]:
        """Return the constructor arguments, so ``DenseRNN(**model.config())`` rebuilds it."""
        return {"d_in": self.d_in, "d_out": self.d_out, "d_hidden": self.d_hidden}

    def initial_state(self, batch_size: int) -> Tensor:
        """Return the zero initial state (``B, H``)."""
        check_int("batch_size", batch_size, minimum=1)
        weight = self.recurrent.weight
        return torch.zeros(batch_size, self.state_size, dtype=weight.dtype, device=weight.device)

    def step(self, x: Tensor, h: Tensor) -> StepOutput:
        """Advance the state by one step for a batch (``x``: B x d_in, ``h``: B x H)."""
        check_step_inputs(self, x, h)
        return self.functional_step(dict(self.named_parameters()), x, h)

    def functional_step(self, params: dict[str, Tensor], x: Tensor, h: Tensor) -> StepOutput:
        """Step with explicit parameters; works on any leading dimensions (vmap-safe)."""
        pre = F.linear(x, params["input_map.weight"], params["input_map.bias"])
        state = torch.tanh(pre + F.linear(h, params["recurrent.weight"]))
        return StepOutput(self.output(params, x, state), state, None)

    def core_parameters(self) -> dict[str, Tensor]:
        """Return all parameters by name (a dense RNN has no expert bank)."""
        return dict(self.named_parameters())

    def output(self, params: dict[str, Tensor], x: Tensor, state: Tensor) -> Tensor:
        """Return the logits read from the new state."""
        return F.linear(state, params["head.weight"], params["head.bias"])
