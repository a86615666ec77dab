"""State Jacobians that are the identity except on some rows, and their factors.

A step of ``RecurrentMoE`` copies every unwritten slot, so its state Jacobian
J_t = dh_{t+1}/dh_t equals the identity outside the rows of the write set.
:class:`RowSparseJacobian` stores only the changed rows, per sample; a product
of such matrices is again of that form, with the union of the row sets.

:func:`moe_step_factors` differentiates the shared update c and the write
weights beta of one step. Every written row is built from them, so these
``d_model + k_write`` Jacobian rows replace the ``k_write * d_model`` rows of
the written slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from rtrl_moe.layout import ParameterLayout
from rtrl_moe.models import RecurrentMoE, Routing, _gather_slots


@dataclass(frozen=True)
class RowSparseJacobian:
    """A batch of ``H x H`` matrices equal to the identity except on listed rows.

    ``rows`` (``B, m``, long) lists, per sample, distinct row indices and
    ``values`` (``B, m, H``) the full rows there. Samples may change different
    rows. A listed row may equal the identity row, which lets samples with
    fewer changed rows be padded to a common ``m``. ``m = 0`` is the identity.
    """

    rows: Tensor
    values: Tensor

    @property
    def size(self) -> int:
        """Matrix size H."""
        return self.values.shape[-1]

    @classmethod
    def identity(cls, batch_size: int, size: int, *, dtype: torch.dtype,
                 device: torch.device | None = None) -> RowSparseJacobian:
        """Return the identity (no changed rows)."""
        rows = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return cls(rows, torch.empty(batch_size, 0, size, dtype=dtype, device=device))

    def to_dense(self) -> Tensor:
        """Return the dense matrices (``B, H, H``)."""
        batch = self.rows.shape[0]
        eye = torch.eye(self.size, dtype=self.values.dtype, device=self.values.device)
        dense = eye.expand(batch, -1, -1).clone()
        index = self.rows.unsqueeze(-1).expand_as(self.values)
        return dense.scatter(1, index, self.values)

    def rows_of(self, rows: Tensor) -> Tensor:
        """Return the rows ``rows`` (``B, r``) of the matrices, identity rows included."""
        lookup = torch.full((rows.shape[0], self.size + 1), -1, dtype=torch.long,
                            device=rows.device)
        positions = torch.arange(self.rows.shape[1], device=rows.device)
        lookup.scatter_(1, self.rows, positions.expand_as(self.rows))
        found = torch.gather(lookup, 1, rows)

        result = torch.nn.functional.one_hot(rows, self.size).to(self.values.dtype)
        listed = found >= 0
        if listed.any():
            gathered = torch.gather(self.values, 1,
                                    found.clamp(min=0).unsqueeze(-1).expand_as(result))
            result = torch.where(listed.unsqueeze(-1), gathered, result)
        return result

    def compose(self, later: RowSparseJacobian) -> RowSparseJacobian:
        """Return ``later @ self`` (apply ``self`` first), again in row-sparse form.

        Row r of the product is ``later[r] @ self``. Since ``self`` is the identity
        plus ``D = values - I[rows]`` on its rows, ``x @ self = x + x[rows] @ D``.
        """
        union = _row_union(self.rows, later.rows, self.size)
        later_rows = later.rows_of(union)
        if self.rows.shape[1] == 0:
            return RowSparseJacobian(union, later_rows)

        eye_rows = torch.nn.functional.one_hot(self.rows, self.size).to(self.values.dtype)
        delta = self.values - eye_rows
        weights = torch.gather(later_rows, 2,
                               self.rows.unsqueeze(1).expand(-1, union.shape[1], -1))
        return RowSparseJacobian(union, later_rows + torch.bmm(weights, delta))

    def apply(self, sensitivity: Tensor) -> None:
        """Replace ``sensitivity`` (``B, H, n``) by ``self @ sensitivity`` in place.

        Only the listed rows are written; every other row is left untouched.
        """
        if self.rows.shape[1] == 0:
            return
        new_rows = torch.bmm(self.values, sensitivity)
        index = self.rows.unsqueeze(-1).expand_as(new_rows)
        sensitivity.scatter_(1, index, new_rows)

    def left_apply(self, vector: Tensor) -> Tensor:
        """Return ``vector @ self`` for row vectors ``vector`` (``B, H``)."""
        if self.rows.shape[1] == 0:
            return vector
        picked = torch.gather(vector, 1, self.rows)
        cleared = vector.scatter(1, self.rows, torch.zeros_like(picked))
        return cleared + torch.bmm(picked.unsqueeze(1), self.values).squeeze(1)


def compose_jacobians(earlier: RowSparseJacobian, later: RowSparseJacobian) -> RowSparseJacobian:
    """Segment-tree combine for Jacobians: the product ``later @ earlier``."""
    return earlier.compose(later)


def _row_union(first: Tensor, second: Tensor, size: int) -> Tensor:
    """Return per-sample row unions padded with unlisted rows to a common width."""
    batch = first.shape[0]
    member = torch.zeros(batch, size, dtype=torch.bool, device=first.device)
    member.scatter_(1, first, True)
    member.scatter_(1, second, True)
    width = int(member.sum(1).max())

    order = torch.arange(size, device=first.device)
    keys = torch.where(member, order, order + size)
    return torch.sort(keys, dim=1).values[:, :width] % size


@dataclass(frozen=True)
class StepFactors:
    """Jacobian factors of one ``RecurrentMoE`` step for a batch.

    c is computed from the read slots and beta from the write slots only, so
    each needs one block of the state Jacobian. The read slots and the write
    slots are gathered as two separate inputs, so a slot in both sets gets
    both contributions.

    * ``d_update_read`` (``B, D, k_read * D``): dc/dh over the read slots.
    * ``d_weights_write`` (``B, k_write, k_write * D``): dbeta/dh over the write slots.
    * ``d_update_core`` (``B, D, n_core``), ``d_weights_core`` (``B, k_write, n_core``):
      immediate Jacobians of c and beta for the core parameters.
    * ``d_update_selected`` (``B, D, k_experts, expert_size``): immediate Jacobian
      of c for the selected experts' parameters (beta uses no expert).
    * ``update`` c (``B, D``), ``weights`` beta (``B, k_write``), ``old_written``
      the written slots before the step (``B, k_write, D``).

    The immediate blocks are None in copies kept only to rebuild J_t.
    """

    d_update_read: Tensor
    d_weights_write: Tensor
    d_update_core: Tensor | None
    d_weights_core: Tensor | None
    d_update_selected: Tensor | None
    update: Tensor
    weights: Tensor
    old_written: Tensor
    routing: Routing


def moe_step_factors(model: RecurrentMoE, layout: ParameterLayout, x: Tensor, h: Tensor,
                     routing: Routing) -> StepFactors:
    """Differentiate c and beta of one step with respect to the slots and parameters used."""
    slots = h.reshape(h.shape[0], model.n_slots, model.d_model)
    read_slots = _gather_slots(slots, routing.read)
    write_slots = _gather_slots(slots, routing.write)
    core = {name: p.detach() for name, p in model.core_parameters().items()}
    selected = {name: p.detach() for name, p in model.experts.select(routing.experts).items()}

    def factors(core, selected, read_slots, write_slots, x):
        c = model.update_vector(core, selected, read_slots, x)
        u = torch.cat([c, model.write_weights(core, write_slots)], dim=-1)
        return u, u

    # One reverse pass per row of u = [c, beta]; the blocks dc/dh_W and
    # dbeta/dh_R are exactly zero and are dropped below.
    jacobian = jacrev(factors, argnums=(0, 1, 2, 3), has_aux=True)
    (d_core, d_selected, d_read, d_write), u = vmap(jacobian, in_dims=(None, 0, 0, 0, 0))(
        core, selected, read_slots, write_slots, x)

    batch, d = x.shape[0], model.d_model
    d_core = layout.flatten_core(d_core, batch_dims=2)
    return StepFactors(
        d_update_read=d_read[:, :d].reshape(batch, d, -1),
        d_weights_write=d_write[:, d:].reshape(batch, model.k_write, -1),
        d_update_core=d_core[:, :d],
        d_weights_core=d_core[:, d:],
        d_update_selected=layout.flatten_experts(d_selected, batch_dims=3)[:, :d],
        update=u[:, :d],
        weights=u[:, d:],
        old_written=write_slots,
        routing=routing,
    )


def written_rows(model: RecurrentMoE, write: Tensor) -> Tensor:
    """Return the state rows of the written slots (``B, k_write * d_model``)."""
    offsets = torch.arange(model.d_model, device=write.device)
    return (write.unsqueeze(-1) * model.d_model + offsets).reshape(write.shape[0], -1)


def state_jacobian(model: RecurrentMoE, factors: StepFactors) -> RowSparseJacobian:
    """Assemble the row-sparse state Jacobian J_t from the step factors.

    Written slot j is ``(1 - beta_j) old_j + beta_j c``, so its rows are
    ``beta_j dc/dh_R`` on the read columns, ``(c - old_j) dbeta_j/dh_W`` on the
    write columns, plus ``(1 - beta_j) I`` on its own block.
    """
    batch, n_slots, d = factors.update.shape[0], model.n_slots, model.d_model
    k_read, k_write = model.k_read, model.k_write
    beta = factors.weights
    gap = factors.update.unsqueeze(1) - factors.old_written            # B, kw, D
    values = torch.zeros(batch, k_write, d, n_slots, d, dtype=beta.dtype, device=beta.device)

    d_update = factors.d_update_read.reshape(batch, 1, d, k_read, d)
    block = beta[:, :, None, None, None] * d_update
    target = factors.routing.read[:, None, None, :, None].expand_as(block)
    values.scatter_add_(3, target, block)

    d_beta = factors.d_weights_write.reshape(batch, k_write, 1, k_write, d)
    block = gap[:, :, :, None, None] * d_beta
    target = factors.routing.write[:, None, None, :, None].expand_as(block)
    values.scatter_add_(3, target, block)

    eye = torch.eye(d, dtype=beta.dtype, device=beta.device)
    own = ((1 - beta)[:, :, None, None] * eye).unsqueeze(3)            # B, kw, D, 1, D
    target = factors.routing.write[:, :, None, None, None].expand_as(own)
    values.scatter_add_(3, target, own)

    rows = written_rows(model, factors.routing.write)
    return RowSparseJacobian(rows, values.reshape(batch, k_write * d, n_slots * d))
