"""A training loop shared by every gradient method.

The trainer knows nothing about the method: it asks an engine (BPTT or one of
the RTRL variants) for gradients and applies them with any torch optimizer.
With ``update_every=k`` the parameters change every k steps inside a sequence:
online RTRL keeps its sensitivities across the update, while BPTT becomes
truncated BPTT with window k. Progress goes to callbacks, one call per sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import pandas as pd
import torch
from torch import Tensor, nn

from rtrl_moe._checks import check_int, check_positive_float
from rtrl_moe.gradients import METHODS, make_engine, validate_sequence
from rtrl_moe.rtrl import IGNORE_INDEX
from rtrl_moe.seeding import set_seed

logger = logging.getLogger(__name__)

Callback = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run.

    Attributes
    ----------
    method : str
        ``"bptt"``, ``"rtrl-dense"``, ``"rtrl-sparse"`` or ``"rtrl-lazy"``.
    sequences : int
        Number of sequences (batches) to train on.
    batch_size : int
        Samples per sequence.
    lr : float
        Learning rate of the default Adam optimizer.
    clip_norm : float or None
        Clip the global gradient norm to this value before each update; None disables.
    update_every : int or None
        Update the parameters every this many steps inside a sequence (online
        RTRL, truncated BPTT); None updates once at the end of each sequence.
    capacity : int or None
        Segment-tree capacity for ``rtrl-lazy``; None takes the engine default.
    seed : int
        Seeds the global generators (when the trainer is built) and the data generator.
    """

    method: str = "bptt"
    sequences: int = 100
    batch_size: int = 1
    lr: float = 2e-3
    clip_norm: float | None = 1.0
    update_every: int | None = None
    capacity: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        check_int("sequences", self.sequences, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive_float("lr", self.lr)
        if self.clip_norm is not None:
            check_positive_float("clip_norm", self.clip_norm)
        if self.update_every is not None:
            check_int("update_every", self.update_every, minimum=1)
        if self.capacity is not None:
            check_int("capacity", self.capacity, minimum=1)
        check_int("seed", self.seed, minimum=0)


class Trainer:
    """Train a recurrent model on a task with one of the gradient methods.

    Parameters
    ----------
    model : nn.Module
        ``RecurrentMoE`` or ``DenseRNN``; its dtype decides the data dtype.
    task : object
        A task from :mod:`rtrl_moe.tasks` (anything with ``sample(batch_size, generator)``).
    config : TrainConfig
    optimizer : torch.optim.Optimizer, optional
        Defaults to Adam with ``config.lr``.
    callbacks : iterable of callables
        Each is called with the metrics row (a dict) after every sequence.
    """

    def __init__(self, model: nn.Module, task, config: TrainConfig,
                 optimizer: torch.optim.Optimizer | None = None,
                 callbacks: Iterable[Callback] = ()) -> None:
        self.model, self.task, self.config = model, task, config
        if task.d_in != model.d_in:
            raise ValueError(f"task d_in={task.d_in} does not match model d_in={model.d_in}")
        if task.d_out is not None and task.d_out > model.d_out:
            raise ValueError(f"task d_out={task.d_out} exceeds model d_out={model.d_out}")
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr)
        self.callbacks = list(callbacks)
        capacity = config.capacity if config.method == "rtrl-lazy" else None
        self.engine = make_engine(model, config.method, capacity=capacity)
        self.generator = set_seed(config.seed)
        self.rows: list[dict] = []
        self.updates = 0

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per sequence: loss, accuracy, updates and wall time."""
        return pd.DataFrame(self.rows)

    def run(self) -> pd.DataFrame:
        """Train for the remaining sequences and return the metrics."""
        logger.info("training %s with %s for %d sequences", type(self.model).__name__,
                    self.config.method, self.config.sequences)
        while len(self.rows) < self.config.sequences:
            self.train_sequence()
        return self.metrics

    def train_sequence(self) -> dict:
        """Sample one batch, train on it and record its metrics row."""
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        batch = self.task.sample(self.config.batch_size, self.generator).to(dtype, device)
        targets = validate_sequence(self.model, batch.inputs, batch.targets)

        start = time.perf_counter()
        loss, correct, counted = self._run_steps(batch.inputs, targets)
        row = {
            "sequence": len(self.rows),
            "loss": loss,
            "accuracy": correct / counted if counted else float("nan"),
            "updates": self.updates,
            "steps": batch.inputs.shape[1],
            "wall_time": time.perf_counter() - start,
        }
        self.rows.append(row)
        for callback in self.callbacks:
            callback(row)
        return row

    def _run_steps(self, inputs: Tensor, targets: Tensor) -> tuple[float, int, int]:
        every = self.config.update_every
        self.engine.begin(inputs.shape[0])
        loss, correct, counted = 0.0, 0, 0
        for t in range(inputs.shape[1]):
            record = self.engine.step(inputs[:, t], targets[:, t])
            if record.loss is not None:
                mask = targets[:, t] != IGNORE_INDEX
                loss += record.loss
                correct += int((record.logits[mask].argmax(-1) == targets[mask, t]).sum())
                counted += int(mask.sum())
            if every is not None and (t + 1) % every == 0 and t + 1 < inputs.shape[1]:
                self._update()
        self._update()
        return loss, correct, counted

    def _update(self) -> None:
        """Apply the gradient accumulated since the last update."""
        gradients = self.engine.take_gradients()
        params = dict(self.model.named_parameters())
        for name, grad in gradients.items():
            params[name].grad = grad
        if self.config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), self.config.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1


def train(model: nn.Module, task, *, callbacks: Iterable[Callback] = (),
          optimizer: torch.optim.Optimizer | None = None, **settings) -> pd.DataFrame:
    """Train ``model`` on ``task``; ``settings`` are the fields of :class:`TrainConfig`."""
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(sorted(known))}")
    trainer = Trainer(model, task, TrainConfig(**settings), optimizer, callbacks)
    return trainer.run()


def config_dict(config: TrainConfig) -> dict:
    """Return the config as a plain dict (for logging and checkpoints)."""
    return asdict(config)


@torch.no_grad()
def evaluate(model: nn.Module, task, samples: int, generator: torch.Generator,
             batch_size: int = 100) -> dict[str, float]:
    """Return the mean loss and the accuracy of ``model`` on ``samples`` fresh task samples.

    Every step with a target counts once; the loss is the cross-entropy averaged
    over those steps.
    """
    check_int("samples", samples, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    weight = next(model.parameters())
    total_loss, correct, counted = 0.0, 0, 0
    for start in range(0, samples, batch_size):
        size = min(batch_size, samples - start)
        batch = task.sample(size, generator).to(weight.dtype, weight.device)
        targets = validate_sequence(model, batch.inputs, batch.targets)
        state = model.initial_state(size)
        for t in range(batch.inputs.shape[1]):
            out = model.step(batch.inputs[:, t], state)
            state = out.state
            mask = targets[:, t] != IGNORE_INDEX
            if bool(mask.any()):
                logits, labels = out.logits[mask], targets[mask, t]
                total_loss += float(torch.nn.functional.cross_entropy(
                    logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                counted += int(mask.sum())
    return {"loss": total_loss / counted, "accuracy": correct / counted}
