"""Exact real-time recurrent learning: dense, sparse and lazy sensitivity updates.

Notation, per sample: P_t = dh_t/dtheta (``H x n``), J_t = dh_{t+1}/dh_t and
G_t = dh_{t+1}/dtheta with h_t held fixed. The recursion is

    P_{t+1} = J_t P_t + G_t,    P_0 = 0 (the initial state is not learned),

and a loss L_t that reads h_{t+1} has the gradient
``dL_t/dtheta = (dL_t/dh_{t+1}) P_{t+1} + (direct term through the output head)``.
The sensitivity used for a loss is always that of the state the loss reads.

* ``rtrl-dense`` forms all H rows of J_t and multiplies the whole of P.
* ``rtrl-sparse`` uses the structure of ``RecurrentMoE``: only rows of the write
  set W change, and written slot j is ``(1 - beta_j) old_j + beta_j c``. With
  T = du/dh_{R,W} P_{R,W} + du/dtheta for u = [c, beta] (``d_model + k_write`` rows),
  ``P_{t+1}[j] = (1 - beta_j) P_t[j] + beta_j T_c + (c - old_j) T_beta_j``.
* ``rtrl-lazy`` does the sparse update for the core and for experts selected at
  the step. A dormant expert's columns only move by J_t, so the engine keeps the
  last ``capacity`` Jacobians in a :class:`CircularSegmentTree` and applies their
  product when the expert is selected again or before its pending span would
  exceed the capacity. A loss at a step where an expert is stale multiplies the
  loss gradient through the stored Jacobians first and the stale P last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, vmap

from rtrl_moe._checks import NonFiniteError, check_int
from rtrl_moe.jacobians import (RowSparseJacobian, StepFactors, compose_jacobians,
                                moe_step_factors, state_jacobian)
from rtrl_moe.layout import ParameterLayout
from rtrl_moe.models import RecurrentMoE, Routing
from rtrl_moe.tree import CircularSegmentTree

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_CAPACITY = 64


@dataclass(frozen=True)
class StepRecord:
    """Output of one engine step: the loss (None without targets), the logits and the target count."""

    loss: float | None
    logits: Tensor
    n_targets: int


class GradientEngine:
    """Common interface of the BPTT and RTRL engines used by the trainer.

    ``begin(batch_size)`` starts a sequence, ``step(x_t, y_t)`` advances it by one
    step and takes the loss at that step, and ``take_gradients()`` returns the
    gradient accumulated since the last call (by parameter name) and resets it.
    """

    method = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layout = ParameterLayout(model)
        self.time = 0
        self.state: Tensor | None = None

    def step_loss(self, logits: Tensor, target: Tensor | None) -> Tensor | None:
        """Cross-entropy averaged over the samples that have a target at this step."""
        if target is None:
            return None
        mask = target != IGNORE_INDEX
        if not bool(mask.any()):
            return None
        return F.cross_entropy(logits[mask], target[mask])


class RTRLEngine(GradientEngine):
    """Shared part of the RTRL engines: state, sensitivity, loss and gradient.

    ``memory_budget`` (bytes) caps the estimated memory of a sequence, checked
    in :meth:`begin` before the sensitivity is allocated. None takes half of
    the free memory of the model's device.
    """

    def __init__(self, model: nn.Module, memory_budget: int | None = None) -> None:
        super().__init__(model)
        if memory_budget is not None:
            check_int("memory_budget", memory_budget, minimum=1)
        self.memory_budget = memory_budget
        self.sensitivity: Tensor | None = None
        self._gradient: Tensor | None = None
        self.stats: list[dict] = []
        self._matmuls: list[tuple[int, int, int, int]] = []

    def estimate_memory(self, batch_size: int):
        """Estimate the memory of a sequence of ``batch_size`` samples, as a ``MemoryEstimate``."""
        # Imported here because rtrl_moe.memory imports this module.
        from rtrl_moe.memory import estimate_memory
        return estimate_memory(self.model, self.method, batch_size,
                               capacity=getattr(self, "capacity", None))

    def begin(self, batch_size: int) -> None:
        """Start a new sequence: initial state, zero sensitivity, zero gradient.

        Raises
        ------
        MemoryBudgetError
            If the memory estimate exceeds the budget; raised before the
            sensitivity is allocated.
        """
        from rtrl_moe.memory import check_memory_budget
        weight = next(self.model.parameters())
        # Release the previous sequence first, so that the default budget counts its memory as free.
        self.sensitivity, self._gradient = None, None
        check_memory_budget(self.estimate_memory(batch_size), self.memory_budget, weight.device)

        self.state = self.model.initial_state(batch_size)
        self.sensitivity = torch.zeros(batch_size, self.model.state_size, self.layout.n_params,
                                       dtype=weight.dtype, device=weight.device)
        self._gradient = torch.zeros(self.layout.n_params, dtype=weight.dtype,
                                     device=weight.device)
        self.time = 0
        self.stats = []
        logger.debug("%s: sensitivity of shape %s allocated", self.method,
                     tuple(self.sensitivity.shape))

    def state_dict(self) -> dict:
        """Return the sequence in progress: state h, sensitivity P, gradient, time and stats."""
        return {"state": self.state, "sensitivity": self.sensitivity,
                "gradient": self._gradient, "time": self.time, "stats": list(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a sequence in progress from :meth:`state_dict` output.

        Raises
        ------
        ValueError
            If a tensor does not fit the model (shape or dtype).
        """
        weight = next(self.model.parameters())
        n = self.layout.n_params
        sensitivity = state["sensitivity"]
        batch = None if sensitivity is None else sensitivity.shape[0]
        self.state = _restore_tensor("state", state["state"], weight,
                                     None if batch is None else (batch, self.model.state_size))
        self.sensitivity = _restore_tensor("sensitivity", sensitivity, weight,
                                           None if batch is None
                                           else (batch, self.model.state_size, n))
        self._gradient = _restore_tensor("gradient", state["gradient"], weight, (n,))
        self.time = int(state["time"])
        self.stats = list(state["stats"])

    def take_gradients(self) -> dict[str, Tensor]:
        """Return the gradient accumulated since the last call and reset it."""
        self._flush_pending()
        gradient = self.layout.unflatten(self._gradient.clone())
        self._gradient.zero_()
        return gradient

    def _flush_pending(self) -> None:
        """Hook for engines that defer work (nothing to do by default)."""

    def step(self, x: Tensor, target: Tensor | None = None) -> StepRecord:
        """Advance by one step, update the sensitivity and add this step's loss gradient."""
        with torch.no_grad():
            out = self.model.step(x, self.state)
        self._check_finite(out.state, "state")
        self._matmuls = []
        self._update_sensitivity(x, out)
        self.stats[-1]["matmuls"] = self._matmuls
        self.stats[-1]["flops"] = sum(2 * b * m * k * n for b, m, k, n in self._matmuls)
        self.state = out.state

        loss, n_targets = self._add_loss_gradient(x, out.state, target)
        self.time += 1
        return StepRecord(loss, out.logits, n_targets)

    def _update_sensitivity(self, x: Tensor, out) -> None:
        raise NotImplementedError

    def _add_loss_gradient(self, x: Tensor, new_state: Tensor,
                           target: Tensor | None) -> tuple[float | None, int]:
        """Add ``dL_t/dh_{t+1} P_{t+1}`` and the direct head term to the gradient."""
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True)
                      for n, p in self.model.core_parameters().items()}
            state = new_state.detach().requires_grad_(True)
            logits = self.model.output(params, x, state)
            loss = self.step_loss(logits, target)
            if loss is None:
                return None, 0
            self._check_finite(loss, "loss")
            grads = torch.autograd.grad(loss, [state, *params.values()], allow_unused=True)

        direct = {n: (g if g is not None else torch.zeros_like(p))
                  for (n, p), g in zip(params.items(), grads[1:])}
        self._gradient[: self.layout.n_core] += self.layout.flatten_core(direct, batch_dims=0)
        self._add_state_term(grads[0])
        n_targets = int((target != IGNORE_INDEX).sum())
        return float(loss.detach()), n_targets

    def _add_state_term(self, loss_vector: Tensor) -> None:
        """Add ``sum_b v_b P_b`` for the loss gradient ``v`` (``B, H``) w.r.t. the new state."""
        self._gradient += torch.einsum("bh,bhn->n", loss_vector, self.sensitivity)

    def _check_finite(self, tensor: Tensor, what: str, group: str | None = None) -> None:
        # A sum is one cheap pass and is non-finite whenever an entry is. It can
        # also overflow on huge finite entries, so confirm entry by entry.
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(step=self.time, method=self.method, what=what, group=group)

    def _full_immediate(self, factors: StepFactors) -> tuple[Tensor, Tensor]:
        """Return dc/dtheta (``B, D, n``) and dbeta/dtheta (``B, k_write, n``) over all columns."""
        n_core, n = self.layout.n_core, self.layout.n_params
        d_update = factors.d_update_core.new_zeros(*factors.d_update_core.shape[:2], n)
        d_update[:, :, :n_core] = factors.d_update_core
        experts = d_update[:, :, n_core:].view(*d_update.shape[:2], self.layout.n_experts,
                                               self.layout.expert_size)
        samples = torch.arange(d_update.shape[0], device=d_update.device)
        for i in range(factors.d_update_selected.shape[2]):
            experts[samples, :, factors.routing.experts[:, i]] = factors.d_update_selected[:, :, i]

        d_weights = factors.d_weights_core.new_zeros(*factors.d_weights_core.shape[:2], n)
        d_weights[:, :, :n_core] = factors.d_weights_core
        return d_update, d_weights


def _restore_tensor(name: str, tensor: Tensor | None, like: Tensor,
                    shape: tuple[int, ...] | None) -> Tensor | None:
    """Move a saved tensor to ``like``'s device after checking its dtype and shape."""
    if tensor is None:
        return None
    if tensor.dtype != like.dtype:
        raise ValueError(f"saved {name} has dtype {tensor.dtype}, but the model has {like.dtype}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"saved {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.to(like.device)


Additions = list[tuple[slice, Tensor]]


def sparse_update(model: RecurrentMoE, sensitivity: Tensor, factors: StepFactors,
                  update_immediate: Additions = (), weights_immediate: Additions = (),
                  matmuls: list | None = None) -> bool:
    """Apply one step to the written rows of ``sensitivity`` (``B, H, n``) in place.

    ``update_immediate`` and ``weights_immediate`` list the nonzero column blocks
    of dc/dtheta (``B, D, width``) and dbeta/dtheta (``B, k_write, width``) for
    these columns, as ``(columns, block)`` pairs. The shapes ``(batch, m, k, n)``
    of the products on P are appended to ``matmuls`` when given. Returns False
    if a new row is not finite.
    """
    batch, _, n = sensitivity.shape
    d = model.d_model
    slots = sensitivity.view(batch, model.n_slots, d, n)
    # NOTE: one Python iteration per sample, and .tolist() synchronises a GPU;
    # a batched kernel would serve large batches better.
    read, write = factors.routing.read.tolist(), factors.routing.write.tolist()
    gap = factors.update.unsqueeze(1) - factors.old_written            # B, kw, D
    finite = True
    for b in range(batch):
        total_update = _slot_product(factors.d_update_read[b], slots[b], read[b])
        total_weights = _slot_product(factors.d_weights_write[b], slots[b], write[b])
        for columns, block in update_immediate:
            total_update[:, columns] += block[b]
        for columns, block in weights_immediate:
            total_weights[:, columns] += block[b]

        checksum = total_update.sum() + total_weights.sum()
        for j, slot in enumerate(write[b]):
            rows = slots[b, slot]
            rows.lerp_(total_update, factors.weights[b, j])
            rows.addr_(gap[b, j], total_weights[j])
        finite = finite and bool(torch.isfinite(checksum))

    if matmuls is not None:
        matmuls += [(batch, d, model.k_read * d, n), (batch, model.k_write, model.k_write * d, n)]
    return finite


def _slot_product(jacobian: Tensor, slots: Tensor, index: list[int]) -> Tensor:
    """Return ``jacobian @ P[slots in index]`` without gathering P (``m, n``)."""
    d = slots.shape[1]
    total = jacobian[:, :d] @ slots[index[0]]
    for i, slot in enumerate(index[1:], start=1):
        total.addmm_(jacobian[:, i * d:(i + 1) * d], slots[slot])
    return total


class DenseRTRL(RTRLEngine):
    """Exact RTRL with all H rows of the state Jacobian and every parameter each step."""

    method = "rtrl-dense"

    def _update_sensitivity(self, x: Tensor, out) -> None:
        if isinstance(self.model, RecurrentMoE):
            self._update_moe(x, out)
        else:
            self._update_generic(x)
        self._check_finite(self.sensitivity, "sensitivity", "all parameters")
        self.stats.append({"step": self.time, "rows_touched": self.sensitivity.shape[0]
                           * self.sensitivity.shape[1]})

    def _update_moe(self, x: Tensor, out) -> None:
        factors = moe_step_factors(self.model, self.layout, x, self.state, out.routing)
        _check_factors(self, factors)
        jacobian = state_jacobian(self.model, factors).to_dense()
        sensitivity = torch.bmm(jacobian, self.sensitivity)
        self._matmuls.append((jacobian.shape[0], jacobian.shape[1], jacobian.shape[2],
                              sensitivity.shape[2]))

        d_update, d_weights = self._full_immediate(factors)
        beta = factors.weights[:, :, None, None]
        gap = (factors.update.unsqueeze(1) - factors.old_written).unsqueeze(-1)
        written = beta * d_update.unsqueeze(1) + gap * d_weights.unsqueeze(2)

        batch, n = sensitivity.shape[0], sensitivity.shape[-1]
        slots = sensitivity.view(batch, self.model.n_slots, self.model.d_model, n)
        samples = torch.arange(batch, device=x.device).unsqueeze(1)
        slots[samples, factors.routing.write] += written
        self.sensitivity = sensitivity

    def _update_generic(self, x: Tensor) -> None:
        params = {n: p.detach() for n, p in self.model.named_parameters()}

        def next_state(params, x, h):
            return self.model.functional_step(params, x, h).state

        jacobian = jacrev(next_state, argnums=(0, 2))
        d_params, d_state = vmap(jacobian, in_dims=(None, 0, 0))(params, x, self.state)
        immediate = self.layout.flatten_core(d_params, batch_dims=2)
        self._check_finite(d_state, "state Jacobian")
        self._check_finite(immediate, "immediate Jacobian", "core")
        self.sensitivity = torch.baddbmm(immediate, d_state, self.sensitivity)
        self._matmuls.append((d_state.shape[0], d_state.shape[1], d_state.shape[2],
                              immediate.shape[2]))


class SparseRTRL(RTRLEngine):
    """Exact RTRL that updates only the written rows, from the read and write columns."""

    method = "rtrl-sparse"

    def _update_sensitivity(self, x: Tensor, out) -> None:
        factors = moe_step_factors(self.model, self.layout, x, self.state, out.routing)
        _check_factors(self, factors)
        n_core = self.layout.n_core
        core = slice(0, n_core)
        experts = [(slice(self.layout.expert_slice(e).start - n_core,
                          self.layout.expert_slice(e).stop - n_core),
                    _expert_immediate(factors, e)) for e in _chosen(factors)]

        finite = sparse_update(self.model, self.sensitivity[:, :, core], factors,
                               [(core, factors.d_update_core)],
                               [(core, factors.d_weights_core)], self._matmuls)
        if not finite:
            self._check_finite(self.sensitivity[:, :, core], "sensitivity", "core")
        if self.layout.n_experts:
            block = self.sensitivity[:, :, n_core:]
            if not sparse_update(self.model, block, factors, experts, (), self._matmuls):
                self._check_finite(block, "sensitivity", "experts")

        rows = self.sensitivity.shape[0] * self.model.k_write * self.model.d_model
        self.stats.append({"step": self.time, "rows_touched": rows})


def _chosen(factors: StepFactors) -> list[int]:
    """Return the experts selected by at least one sample, in increasing order."""
    return factors.routing.experts.unique().tolist()


def _expert_immediate(factors: StepFactors, expert: int) -> Tensor:
    """Return dc/dtheta_e (``B, D, expert_size``); zero for samples that did not choose e."""
    mask = (factors.routing.experts == expert).to(factors.d_update_selected.dtype)
    return torch.einsum("bk,bdkn->bdn", mask, factors.d_update_selected)


def _check_factors(engine: RTRLEngine, factors: StepFactors) -> None:
    engine._check_finite(factors.d_update_read, "state Jacobian")
    engine._check_finite(factors.d_weights_write, "state Jacobian")
    engine._check_finite(factors.d_update_core, "immediate Jacobian", "core")
    engine._check_finite(factors.d_weights_core, "immediate Jacobian", "core")
    for i in range(factors.d_update_selected.shape[2]):
        block = factors.d_update_selected[:, :, i]
        if not bool(torch.isfinite(block.sum())):
            chosen = factors.routing.experts[:, i].unique().tolist()
            engine._check_finite(block, "immediate Jacobian",
                                 ", ".join(f"expert {e}" for e in chosen))


class _DeferredJacobian:
    """A tree item whose row-sparse matrix is built the first time it is needed.

    Leaves also keep the step factors, so a short span can be applied step by
    step with the cheap sparse update instead of through the dense product.
    """

    __slots__ = ("_build", "_matrix", "factors")

    def __init__(self, build, factors: StepFactors | None = None) -> None:
        self._build, self._matrix, self.factors = build, None, factors

    @property
    def matrix(self) -> RowSparseJacobian:
        if self._matrix is None:
            self._matrix = self._build()
            self._build = None
        return self._matrix


def _leaf(model: RecurrentMoE, state_factors: StepFactors) -> _DeferredJacobian:
    """Return a tree leaf that builds J_t from the state factors when first needed."""
    return _DeferredJacobian(lambda: state_jacobian(model, state_factors), state_factors)


# The StepFactors fields a tree leaf keeps; the immediate blocks are dropped.
_KEPT_FACTORS = ("d_update_read", "d_weights_write", "update", "weights", "old_written")


def _factors_to_dict(factors: StepFactors) -> dict[str, Tensor]:
    """Return the kept factors of a leaf as a flat dict of compact tensor copies."""
    saved = {name: getattr(factors, name).clone() for name in _KEPT_FACTORS}
    for name in ("read", "write", "experts"):
        saved[name] = getattr(factors.routing, name).clone()
    return saved


def _factors_from_dict(saved: dict[str, Tensor], device: torch.device) -> StepFactors:
    """Rebuild the kept factors of a leaf from :func:`_factors_to_dict` output."""
    kept = {name: saved[name].to(device) for name in _KEPT_FACTORS}
    routing = Routing(*(saved[name].to(device) for name in ("read", "write", "experts")))
    return StepFactors(d_update_core=None, d_weights_core=None, d_update_selected=None,
                       routing=routing, **kept)


CATCH_UP_MODES = ("auto", "tree", "sequential")


class LazyRTRL(RTRLEngine):
    """Exact RTRL that defers the updates of dormant experts through a segment tree.

    Parameter groups are the core and one group per expert. ``synced_until[e]``
    is the step whose sensitivity expert e's columns hold: they equal
    ``P_{synced_until[e]}``. The tree keeps the last ``capacity`` state
    Jacobians, so J_k sits at position ``k - (time - len(tree))`` before the
    step's push. An expert catches up by ``P_now = J_{now-1} ... J_s P_s``,
    either through one tree query (cost about H^2 per column plus the
    combines) or by applying the span's steps one by one with the sparse
    update (about ``span * k_read * D^2`` per column); ``catch_up="auto"`` picks
    the cheaper. Tree nodes are built only when a query needs them.
    """

    method = "rtrl-lazy"

    def __init__(self, model: RecurrentMoE, capacity: int = DEFAULT_CAPACITY,
                 catch_up: str = "auto", memory_budget: int | None = None) -> None:
        super().__init__(model, memory_budget)
        if catch_up not in CATCH_UP_MODES:
            raise ValueError(f"catch_up must be one of {', '.join(CATCH_UP_MODES)}, "
                             f"got {catch_up!r}")
        self.capacity, self.catch_up = capacity, catch_up
        self.tree: CircularSegmentTree | None = None
        self.synced_until: list[int] = []
        self._tree_matmuls: list[tuple[int, int, int, int]] = []

    def begin(self, batch_size: int) -> None:
        """Start a new sequence with an empty tree and every expert current."""
        self.tree = None
        super().begin(batch_size)
        self.tree = CircularSegmentTree(self.capacity, self._combine,
                                        self._identity(batch_size))
        self.synced_until = [0] * self.layout.n_experts

    def _identity(self, batch_size: int) -> _DeferredJacobian:
        identity = RowSparseJacobian.identity(batch_size, self.model.state_size,
                                              dtype=self.sensitivity.dtype,
                                              device=self.sensitivity.device)
        return _DeferredJacobian(lambda: identity)

    def state_dict(self) -> dict:
        """Return the RTRL state plus ``synced_until`` and the tree leaves as plain tensors.

        Each kept leaf is stored as the factors J_t is built from, so the
        state contains no closures and loads with ``torch.load(weights_only=True)``.
        """
        state = super().state_dict()
        state["synced_until"] = list(self.synced_until)
        state["tree"] = None
        if self.tree is not None:
            state["tree"] = {"capacity": self.tree.capacity,
                             "total_pushed": self.tree.total_pushed,
                             "items": [_factors_to_dict(item.factors) for item in self.tree.items()]}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a sequence in progress, rebuilding the tree by pushing its leaves again.

        Raises
        ------
        ValueError
            If the saved tree has another capacity or the tensors do not fit the model.
        """
        super().load_state_dict(state)
        synced = [int(step) for step in state["synced_until"]]
        tree = state["tree"]
        if tree is None or self.sensitivity is None:
            self.tree, self.synced_until = None, synced
            return
        if len(synced) != self.layout.n_experts:
            raise ValueError(f"saved synced_until has {len(synced)} entries, expected one per "
                             f"expert ({self.layout.n_experts})")
        if tree["capacity"] != self.capacity:
            raise ValueError(f"saved tree capacity {tree['capacity']} does not match "
                             f"capacity={self.capacity}")

        device = self.sensitivity.device
        leaves = [_leaf(self.model, _factors_from_dict(item, device)) for item in tree["items"]]
        saved = {"capacity": tree["capacity"], "total_pushed": tree["total_pushed"],
                 "items": leaves}
        self.tree = CircularSegmentTree.from_state_dict(
            saved, self._combine, self._identity(self.sensitivity.shape[0]))
        self.synced_until = synced

    def _combine(self, earlier: _DeferredJacobian, later: _DeferredJacobian) -> _DeferredJacobian:
        """Tree combine: the product ``later @ earlier``, built when first needed."""
        def build() -> RowSparseJacobian:
            first, second = earlier.matrix, later.matrix
            product = compose_jacobians(first, second)
            # compose multiplies (union rows x rows of ``first``) by (rows x H).
            self._tree_matmuls.append((product.rows.shape[0], product.rows.shape[1],
                                       first.rows.shape[1], first.size))
            return product

        return _DeferredJacobian(build)

    def _use_tree(self, span: int) -> bool:
        if self.catch_up != "auto":
            return self.catch_up == "tree"
        m = self.model
        per_step = m.k_read * m.d_model ** 2 + m.k_write ** 2 * m.d_model
        combines = max(1, (self.capacity - 1).bit_length()) * m.state_size ** 3
        tree = m.state_size ** 2 + combines / self.layout.expert_size
        return span * per_step > tree

    def _catch_up(self, expert: int, now: int) -> tuple[int, bool]:
        """Bring an expert's sensitivity to P_now; return rows touched and whether the tree was used."""
        span = now - self.synced_until[expert]
        first = now - len(self.tree)
        columns = self.sensitivity[:, :, self.layout.expert_slice(expert)]
        use_tree = self._use_tree(span)
        if use_tree:
            product = self.tree.query(self.synced_until[expert] - first, len(self.tree)).matrix
            product.apply(columns)
            rows = product.rows.numel()
            if product.rows.shape[1]:
                self._matmuls.append((columns.shape[0], product.rows.shape[1], columns.shape[1],
                                      columns.shape[2]))
        else:
            for k in range(self.synced_until[expert], now):
                sparse_update(self.model, columns, self.tree[k - first].factors,
                              matmuls=self._matmuls)
            rows = span * columns.shape[0] * self.model.k_write * self.model.d_model

        self._check_finite(columns, "sensitivity", f"expert {expert}")
        self.synced_until[expert] = now
        return rows, use_tree

    def _update_sensitivity(self, x: Tensor, out) -> None:
        factors = moe_step_factors(self.model, self.layout, x, self.state, out.routing)
        _check_factors(self, factors)
        counts = {"step": self.time, "deferred": 0, "synced": 0, "expired": 0,
                  "tree_queries": 0, "rows_touched": 0}
        self._tree_matmuls = []
        written = self.sensitivity.shape[0] * self.model.k_write * self.model.d_model

        core = self.sensitivity[:, :, : self.layout.n_core]
        everything = slice(None)
        if not sparse_update(self.model, core, factors, [(everything, factors.d_update_core)],
                             [(everything, factors.d_weights_core)], self._matmuls):
            self._check_finite(core, "sensitivity", "core")
        counts["rows_touched"] += written

        active = _chosen(factors)
        for expert in active:
            if self.synced_until[expert] < self.time:
                rows, used_tree = self._catch_up(expert, now=self.time)
                counts["rows_touched"] += rows
                counts["synced"] += 1
                counts["tree_queries"] += int(used_tree)
            columns = self.sensitivity[:, :, self.layout.expert_slice(expert)]
            immediate = [(everything, _expert_immediate(factors, expert))]
            if not sparse_update(self.model, columns, factors, immediate, (), self._matmuls):
                self._check_finite(columns, "sensitivity", f"expert {expert}")
            counts["rows_touched"] += written
            self.synced_until[expert] = self.time + 1

        self._push(factors)
        counts["deferred"] = self.layout.n_experts - len(active)
        counts["active"] = active
        self._expire(self.time + 1, counts)
        counts["tree_flops"] = sum(2 * b * m * k * n for b, m, k, n in self._tree_matmuls)
        self.stats.append(counts)

    def _push(self, factors: StepFactors) -> None:
        """Push J_t, keeping only the factors the state Jacobian needs."""
        state_factors = replace(factors, d_update_core=None, d_weights_core=None,
                                d_update_selected=None)
        self.tree.push(_leaf(self.model, state_factors))

    def _expire(self, now: int, counts: dict) -> None:
        """Sync the experts whose pending span fills the tree, before the next push evicts it."""
        for expert, synced in enumerate(self.synced_until):
            if now - synced >= self.capacity:
                rows, used_tree = self._catch_up(expert, now)
                counts["rows_touched"] += rows
                counts["expired"] += 1
                counts["tree_queries"] += int(used_tree)

    def _add_state_term(self, loss_vector: Tensor) -> None:
        """Add the loss term; stale experts get ``(v J_t ... J_s) P_s``."""
        now = self.time + 1
        core = self.sensitivity[:, :, : self.layout.n_core]
        self._gradient[: self.layout.n_core] += torch.einsum("bh,bhn->n", loss_vector, core)

        vector, reached = loss_vector, now
        first = now - len(self.tree)
        order = sorted(range(self.layout.n_experts), key=lambda e: -self.synced_until[e])
        for expert in order:
            while reached > self.synced_until[expert]:
                reached -= 1
                vector = self.tree[reached - first].matrix.left_apply(vector)
            columns = self.sensitivity[:, :, self.layout.expert_slice(expert)]
            self._gradient[self.layout.expert_slice(expert)] += torch.einsum(
                "bh,bhn->n", vector, columns)
