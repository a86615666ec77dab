"""Non-finite values during training: raise with the step and group, or skip the update."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pytest
import torch

import rtrl_moe.rtrl
from rtrl_moe import NonFiniteError, RecurrentMoE, compute_gradients
from rtrl_moe.tasks import Haystack, SequenceBatch
from rtrl_moe.training import TrainConfig, Trainer

LENGTH = 8
SEQUENCES = 3
BATCH = 2
METHODS = ["bptt", "rtrl-dense", "rtrl-sparse", "rtrl-lazy"]


@dataclass(frozen=True)
class PoisonedTask:
    """Haystack whose batch number ``poisoned`` gets an overflowing input at ``step``.

    The input stays finite (1e200), so it passes validation, but the state it
    produces is not.
    """

    poisoned: int
    step: int
    base: Haystack = Haystack(length=LENGTH, n_values=3, n_distractors=2)

    @property
    def d_in(self) -> int:
        return self.base.d_in

    @property
    def d_out(self) -> int:
        return self.base.d_out

    def sample(self, batch_size: int, generator: torch.Generator) -> SequenceBatch:
        batch = self.base.sample(batch_size, generator).to(torch.float64)
        calls = getattr(self, "_calls", 0)
        object.__setattr__(self, "_calls", calls + 1)
        if calls != self.poisoned:
            return batch
        inputs = batch.inputs.clone()
        inputs[:, self.step] *= 1e200
        return replace(batch, inputs=inputs)


def make_model(dtype: torch.dtype = torch.float64) -> RecurrentMoE:
    torch.manual_seed(0)
    base = PoisonedTask(-1, 0).base
    return RecurrentMoE(base.d_in, base.d_out, d_model=8, n_heads=2, n_slots=4, n_experts=4,
                        k_experts=2, k_read=2, k_write=2).to(dtype)


def make_trainer(method: str, task, policy: str, update_every: int | None = 3,
                 dtype: torch.dtype = torch.float64, clip_norm: float | None = 1.0) -> Trainer:
    config = TrainConfig(method=method, sequences=SEQUENCES, batch_size=BATCH,
                         update_every=update_every, on_nonfinite=policy, seed=2,
                         clip_norm=clip_norm)
    return Trainer(make_model(dtype), task, config)


@pytest.mark.parametrize("method", METHODS)
def test_poisoned_batch_skipped(method, caplog):
    trainer = make_trainer(method, PoisonedTask(poisoned=1, step=4), "skip")
    with caplog.at_level(logging.WARNING, logger="rtrl_moe"):
        metrics = trainer.run()

    # Updates after steps 3 and 6 and at the end; sequence 1 stops after its first.
    assert trainer.updates == 3 + 1 + 3
    assert trainer.skipped == 1
    assert metrics["skipped"].tolist() == [0, 1, 1]
    assert metrics["updates"].tolist() == [3, 4, 7]
    assert len(metrics) == SEQUENCES
    for name, parameter in trainer.model.named_parameters():
        assert bool(torch.isfinite(parameter).all()), name
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "skipped the update in sequence 1" in warnings[0]
    assert "non-finite state at step 4" in warnings[0]


@pytest.mark.parametrize("method", METHODS)
def test_poisoned_batch_raises(method):
    trainer = make_trainer(method, PoisonedTask(poisoned=1, step=4), "raise")
    with pytest.raises(NonFiniteError, match=f"non-finite state at step 4 of method '{method}'"):
        trainer.run()
    assert trainer.updates == 3 + 1
    assert len(trainer.rows) == 1


def test_run_after_raise_starts_new_sequence():
    trainer = make_trainer("rtrl-sparse", PoisonedTask(poisoned=1, step=4), "raise")
    with pytest.raises(NonFiniteError):
        trainer.run()
    metrics = trainer.run()

    assert len(metrics) == SEQUENCES
    assert metrics["sequence"].tolist() == [0, 1, 2]
    assert trainer.updates == 3 + 1 + 3 + 3
    assert metrics["loss"].notna().all()


def poison_factors(monkeypatch, at_call: int) -> list[str]:
    """Put a NaN into the first selected expert's immediate Jacobian at one step.

    Returns a list that receives the expected group name.
    """
    original = rtrl_moe.rtrl.moe_step_factors
    calls, expected = [0], []

    def poisoned(*args, **kwargs):
        factors = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] != at_call:
            return factors
        selected = factors.d_update_selected.clone()
        selected[:, :, 0] = float("nan")
        experts = factors.routing.experts[:, 0].unique().tolist()
        expected.append(", ".join(f"expert {e}" for e in experts))
        return replace(factors, d_update_selected=selected)

    monkeypatch.setattr(rtrl_moe.rtrl, "moe_step_factors", poisoned)
    return expected


@pytest.mark.parametrize("method", ["rtrl-dense", "rtrl-sparse", "rtrl-lazy"])
def test_nonfinite_jacobian_names_group(method, monkeypatch):
    expected = poison_factors(monkeypatch, at_call=LENGTH + 3)
    trainer = make_trainer(method, PoisonedTask(poisoned=-1, step=0), "raise")
    with pytest.raises(NonFiniteError) as raised:
        trainer.run()

    error = raised.value
    assert error.step == 2
    assert error.what == "immediate Jacobian"
    assert error.group == expected[0]
    assert f"for parameter group {expected[0]} at step 2" in str(error)


def poison_gradients(monkeypatch, trainer: Trainer, at_call: int, value: float) -> None:
    """Make the engine's ``at_call``-th gradient hold ``value`` in head.bias and expert 2."""
    original = trainer.engine.take_gradients
    calls = [0]

    def poisoned():
        gradients = original()
        calls[0] += 1
        if calls[0] == at_call:
            gradients["head.bias"][0] = value
            gradients["experts.weight"][2, 0, 0] = value
        return gradients

    monkeypatch.setattr(trainer.engine, "take_gradients", poisoned)


@pytest.mark.parametrize("method", ["bptt", "rtrl-lazy"])
def test_nonfinite_gradient_names_groups(method, monkeypatch):
    trainer = make_trainer(method, PoisonedTask(poisoned=-1, step=0), "raise", update_every=None)
    poison_gradients(monkeypatch, trainer, at_call=2, value=float("inf"))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient for parameter group "
                                             r"core \(head.bias\), expert 2 at step 7"):
        trainer.run()


@pytest.mark.parametrize("method", ["bptt", "rtrl-sparse"])
def test_nonfinite_gradient_skipped(method, monkeypatch):
    trainer = make_trainer(method, PoisonedTask(poisoned=-1, step=0), "skip", update_every=None)
    poison_gradients(monkeypatch, trainer, at_call=2, value=float("nan"))
    before = {}

    def remember(row):
        if row["sequence"] == 0:
            before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        if row["sequence"] == 1:
            for name, parameter in trainer.model.named_parameters():
                assert torch.equal(parameter, before[name]), f"{name} changed by a skipped update"

    trainer.callbacks.append(remember)
    metrics = trainer.run()
    assert metrics["skipped"].tolist() == [0, 1, 1]
    assert trainer.updates == 2
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2


def test_gradient_norm_overflow_raises(monkeypatch):
    trainer = make_trainer("rtrl-sparse", PoisonedTask(poisoned=-1, step=0), "raise",
                           update_every=None, dtype=torch.float32)
    poison_gradients(monkeypatch, trainer, at_call=1, value=1e30)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm for parameter group "
                                             "all parameters at step 7"):
        trainer.run()
    assert trainer.updates == 0


def test_gradient_norm_unclipped_is_not_checked(monkeypatch):
    trainer = make_trainer("rtrl-sparse", PoisonedTask(poisoned=-1, step=0), "raise",
                           update_every=None, dtype=torch.float32, clip_norm=None)
    poison_gradients(monkeypatch, trainer, at_call=1, value=1e30)
    trainer.run()
    assert trainer.updates == SEQUENCES


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_loss_raises(method):
    model = make_model()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    inputs = torch.randn(BATCH, 3, model.d_in, dtype=torch.float64)
    targets = torch.tensor([[-100, 1, 0], [-100, 2, 1]])
    with pytest.raises(NonFiniteError, match=f"non-finite loss at step 1 of method '{method}'"):
        compute_gradients(model, inputs, targets, method=method)
