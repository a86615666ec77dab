"""Backpropagation through time, full or truncated, behind the engine interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtrl_moe.rtrl import GradientEngine, StepRecord


class BPTTEngine(GradientEngine):
    """Backpropagation through time.

    The graph grows from ``begin`` (or the previous ``take_gradients``) until
    ``take_gradients`` runs the backward pass and detaches the state. Calling
    ``take_gradients`` every k steps is truncated BPTT with window k; calling it
    once at the end of the sequence is full BPTT.
    """

    method = "bptt"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._loss: Tensor | None = None
        self._gradient: dict[str, Tensor] = {}

    def begin(self, batch_size: int) -> None:
        """Start a new sequence from the initial state with a zero gradient."""
        self.state = self.model.initial_state(batch_size)
        self._loss = None
        self._gradient = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}
        self.time = 0

    def step(self, x: Tensor, target: Tensor | None = None) -> StepRecord:
        """Advance by one step, keeping the graph, and add this step's loss."""
        with torch.enable_grad():
            out = self.model.step(x, self.state)
            loss = self.step_loss(out.logits, target)
        if not bool(torch.isfinite(out.state).all()):
            from rtrl_moe._checks import NonFiniteError
            raise NonFiniteError(step=self.time, method=self.method, what="state")
        self.state = out.state
        self.time += 1
        if loss is None:
            return StepRecord(None, out.logits.detach(), 0)

        self._loss = loss if self._loss is None else self._loss + loss
        n_targets = int((target != -100).sum())
        return StepRecord(float(loss.detach()), out.logits.detach(), n_targets)

    def take_gradients(self) -> dict[str, Tensor]:
        """Backpropagate the losses since the last call, detach the state, return the gradient."""
        if self._loss is not None:
            names, params = zip(*self.model.named_parameters())
            grads = torch.autograd.grad(self._loss, params, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    self._gradient[name] += grad
        self._loss = None
        self.state = self.state.detach()

        gradient = {n: g.clone() for n, g in self._gradient.items()}
        for g in self._gradient.values():
            g.zero_()
        return gradient
