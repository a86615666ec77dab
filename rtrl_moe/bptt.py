"""Backpropagation through time, full or truncated, behind the engine interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtrl_moe._checks import NonFiniteError
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
            raise NonFiniteError(step=self.time, method=self.method, what="state")
        if loss is not None and not bool(torch.isfinite(loss)):
            raise NonFiniteError(step=self.time, method=self.method, what="loss")
        self.state = out.state
        self.time += 1
        if loss is None:
            return StepRecord(None, out.logits.detach(), 0)

        self._loss = loss if self._loss is None else self._loss + loss
        n_targets = int((target != -100).sum())
        return StepRecord(float(loss.detach()), out.logits.detach(), n_targets)

    def state_dict(self) -> dict:
        """Return the state h, the time and the gradient at an update boundary.

        Raises
        ------
        RuntimeError
            If losses since the last ``take_gradients`` are pending, because
            their graph cannot be saved.
        """
        if self._loss is not None:
            raise RuntimeError("BPTT has losses pending since the last take_gradients; "
                               "save its state only at a parameter-update boundary")
        state = None if self.state is None else self.state.detach()
        return {"state": state, "time": self.time, "gradient": dict(self._gradient)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict`; the graph starts empty.

        Raises
        ------
        ValueError
            If a saved tensor does not match the model's dtype or a parameter's shape.
        """
        params = dict(self.model.named_parameters())
        gradient = dict(state["gradient"])
        if gradient and set(gradient) != set(params):
            raise ValueError(f"saved gradient names {sorted(gradient)} do not match the model "
                             f"parameters {sorted(params)}")
        for name, grad in gradient.items():
            if grad.shape != params[name].shape or grad.dtype != params[name].dtype:
                raise ValueError(f"saved gradient {name} has shape {tuple(grad.shape)} and dtype "
                                 f"{grad.dtype}, expected {tuple(params[name].shape)} and "
                                 f"{params[name].dtype}")
        weight = next(iter(params.values()))
        saved = state["state"]
        if saved is not None and (saved.dtype != weight.dtype or saved.dim() != 2
                                  or saved.shape[1] != self.model.state_size):
            raise ValueError(f"saved state has shape {tuple(saved.shape)} and dtype {saved.dtype}, "
                             f"expected (batch, {self.model.state_size}) and {weight.dtype}")

        self.state = None if saved is None else saved.to(weight.device)
        self._gradient = {name: grad.to(weight.device) for name, grad in gradient.items()}
        self.time = int(state["time"])
        self._loss = None

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
