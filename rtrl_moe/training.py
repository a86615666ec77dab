"""A training loop shared by every gradient method.

The trainer is independent of the method. It requests gradients from an engine
(BPTT or one of the RTRL variants) and applies them with any torch optimizer.
With ``update_every=k`` the parameters change every k steps inside a sequence:
online RTRL keeps its sensitivities across the update, while BPTT becomes
truncated BPTT with window k. Progress goes to callbacks, one call per sequence.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import torch
from torch import Tensor, nn

from rtrl_moe._checks import NonFiniteError, check_int, check_positive_float
from rtrl_moe.checkpoint import (FORMAT, FORMAT_VERSION, CheckpointError, build_model,
                                 capture_rng, check_compatible, check_task, describe_task,
                                 model_section, read_checkpoint, restore_rng, write_checkpoint)
from rtrl_moe.gradients import METHODS, make_engine, validate_sequence
from rtrl_moe.models import EXPERT_PREFIX
from rtrl_moe.rtrl import IGNORE_INDEX
from rtrl_moe.seeding import set_seed

logger = logging.getLogger(__name__)

Callback = Callable[[dict], None]

NONFINITE_POLICIES = ("raise", "skip")


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
        Segment-tree capacity for ``rtrl-lazy`` (other methods reject it); None
        takes the engine default.
    seed : int
        Seeds the global generators (when the trainer is built) and the data generator.
    memory_budget : int or None
        Largest estimated memory in bytes of an RTRL engine, checked before the
        sensitivity is allocated (see :func:`rtrl_moe.estimate_memory`); None
        takes half of the free memory of the model's device.
    on_nonfinite : str
        ``"raise"`` stops with :class:`NonFiniteError` at a non-finite loss,
        state, sensitivity or gradient. ``"skip"`` discards the pending update,
        abandons the rest of that sequence, logs a warning and counts it in the
        ``skipped`` column. Either way the sequence in progress is not resumed.
    """

    method: str = "bptt"
    sequences: int = 100
    batch_size: int = 1
    lr: float = 2e-3
    clip_norm: float | None = 1.0
    update_every: int | None = None
    capacity: int | None = None
    seed: int = 0
    memory_budget: int | None = None
    on_nonfinite: str = "raise"

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
            if self.method != "rtrl-lazy":
                raise ValueError(f"capacity applies to method 'rtrl-lazy' only, got "
                                 f"capacity={self.capacity} with method={self.method!r}")
        check_int("seed", self.seed, minimum=0)
        if self.memory_budget is not None:
            check_int("memory_budget", self.memory_budget, minimum=1)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, "
                             f"got {self.on_nonfinite!r}")


@dataclass
class _Progress:
    """The sequence in progress: its batch, the next step and the running totals."""

    inputs: Tensor
    targets: Tensor
    step: int = 0
    loss: float = 0.0
    correct: int = 0
    counted: int = 0
    elapsed: float = 0.0


@dataclass(frozen=True)
class _RunPlan:
    """When one ``Trainer.run`` call writes checkpoints and when it stops."""

    path: Path | None = None
    checkpoint_every: int | None = None
    max_updates: int | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            object.__setattr__(self, "path", _checkpoint_path(self.path))
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, minimum=1)
            if self.path is None:
                raise ValueError(f"checkpoint_every={self.checkpoint_every} needs checkpoint_path")
        if self.max_updates is not None:
            check_int("max_updates", self.max_updates, minimum=1)

    def checkpoint_due(self, updates: int) -> bool:
        return self.checkpoint_every is not None and updates % self.checkpoint_every == 0

    def should_stop(self, updates: int) -> bool:
        return self.max_updates is not None and updates >= self.max_updates


def _checkpoint_path(value: object) -> Path:
    """Return ``value`` as a Path to a file in an existing directory."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"checkpoint_path must be a non-empty str or os.PathLike, got {value!r}")
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"checkpoint_path must name a file, got the directory {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "checkpoint directory not found", str(path.parent))
    return path


def _check_arguments(model: nn.Module, task, config: TrainConfig,
                     optimizer: torch.optim.Optimizer | None) -> None:
    """Raise ValueError unless the trainer's arguments fit together."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "step", None)):
        raise ValueError(f"model must be a RecurrentMoE or DenseRNN, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(getattr(task, "sample", None)) or not hasattr(task, "d_in"):
        raise ValueError(f"task must have d_in and sample(batch_size, generator), got {task!r}")
    if task.d_in != model.d_in:
        raise ValueError(f"task d_in={task.d_in} does not match model d_in={model.d_in}")
    d_out = getattr(task, "d_out", None)
    if d_out is not None and d_out > model.d_out:
        raise ValueError(f"task d_out={d_out} exceeds model d_out={model.d_out}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got "
                         f"{type(optimizer).__name__}")


def _nonfinite_groups(gradients: dict[str, Tensor]) -> str:
    """Name the parameter groups with a NaN or infinite gradient entry ("" if none).

    For example ``"core (head.weight), expert 2"``.
    """
    core, experts = [], set()
    for name, grad in gradients.items():
        bad = ~torch.isfinite(grad)
        if not bool(bad.any()):
            continue
        if name.startswith(EXPERT_PREFIX):
            experts.update(bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist())
        else:
            core.append(name)
    parts = [f"core ({', '.join(core)})"] if core else []
    return ", ".join(parts + [f"expert {expert}" for expert in sorted(experts)])


class Trainer:
    """Train a recurrent model on a task with one of the gradient methods.

    ``run`` can write checkpoints at parameter-update boundaries, and
    :meth:`from_checkpoint` resumes from one with results bitwise equal to an
    uninterrupted run on CPU.

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
        _check_arguments(model, task, config, optimizer)
        listed = list(callbacks) if isinstance(callbacks, Iterable) else None
        if listed is None or not all(callable(callback) for callback in listed):
            raise ValueError(f"callbacks must be an iterable of callables, got {callbacks!r}")
        self.model, self.task, self.config = model, task, config
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr)
        self.callbacks = listed
        self.engine = make_engine(model, config.method, capacity=config.capacity,
                                  memory_budget=config.memory_budget)
        self.generator = set_seed(config.seed)
        self.rows: list[dict] = []
        self.updates = 0
        self.skipped = 0
        self._progress: _Progress | None = None
        self._saved_position: tuple[int, int, int] | None = None

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per sequence: loss, accuracy, updates, skipped updates and wall time."""
        return pd.DataFrame(self.rows)

    def run(self, *, checkpoint_path: str | os.PathLike | None = None,
            checkpoint_every: int | None = None,
            max_updates: int | None = None) -> pd.DataFrame:
        """Train for the remaining sequences and return the metrics.

        Parameters
        ----------
        checkpoint_path : str or os.PathLike, optional
            Where to write checkpoints (see :meth:`save_checkpoint`). One is
            written every ``checkpoint_every`` updates and when the run ends
            or stops.
        checkpoint_every : int, optional
            Write a checkpoint after every this many parameter updates; needs
            ``checkpoint_path``.
        max_updates : int, optional
            Stop once the total number of updates (counted from the start of
            training, resumed runs included) reaches this value, even in the
            middle of a sequence. A later ``run`` or a resumed trainer continues
            from there.
        """
        plan = _RunPlan(checkpoint_path, checkpoint_every, max_updates)
        logger.info("training %s with %s for %d sequences, from sequence %d and update %d",
                    type(self.model).__name__, self.config.method, self.config.sequences,
                    len(self.rows), self.updates)
        stopped = plan.should_stop(self.updates)
        while not stopped and len(self.rows) < self.config.sequences:
            stopped = self._train_sequence(plan)

        if plan.path is not None:
            self._checkpoint_once(plan.path)
        if stopped:
            logger.info("stopped at max_updates=%d in sequence %d", plan.max_updates,
                        len(self.rows))
        return self.metrics

    def train_sequence(self) -> dict:
        """Train on one sequence (the one in progress, else a new batch) and return its row."""
        self._train_sequence(_RunPlan())
        return self.rows[-1]

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the whole training state to ``path`` atomically and return the path.

        Call it between updates (``run`` only stops there), never from inside
        a step. See :mod:`rtrl_moe.checkpoint` for the contents.
        """
        path = write_checkpoint(self._checkpoint_payload(), path)
        self._saved_position = self._position()
        logger.info("wrote checkpoint %s at update %d (sequence %d, step %d)", path,
                    self.updates, len(self.rows), self._progress.step if self._progress else 0)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the training state saved at ``path`` into this trainer.

        The model, the config (except ``sequences``, ``memory_budget`` and
        ``on_nonfinite``), the task and the optimizer class must match the
        checkpoint. If the restore fails after these checks, the trainer's
        state is undefined; build a new one.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        CheckpointError
            If the file is unreadable, not a checkpoint, or does not match.
        """
        payload = read_checkpoint(path)
        check_compatible(payload, self.model, config_dict(self.config), self.task)
        self._restore(payload, path)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, task, callbacks: Iterable[Callback] = (),
                        optimizer_factory: Callable | None = None, *,
                        device: torch.device | str | None = None) -> Trainer:
        """Rebuild a trainer (model, optimizer, engine, position) from a checkpoint.

        Parameters
        ----------
        path : str or os.PathLike
        task : object
            The task of the saved run; its class and fields must match.
        callbacks : iterable of callables
        optimizer_factory : callable, optional
            Called with the model parameters to build the optimizer; the saved
            optimizer state is loaded into it. Defaults to Adam.
        device : torch.device or str, optional
            Where to put the model; defaults to the device it was saved from.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        CheckpointError
            If the file is unreadable, not a checkpoint, or does not fit.
        """
        payload = read_checkpoint(path)
        check_task(payload, task)
        model = build_model(payload, device)
        try:
            config = TrainConfig(**payload["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} has an invalid config: {error}") from error

        optimizer = None if optimizer_factory is None else optimizer_factory(model.parameters())
        trainer = cls(model, task, config, optimizer, callbacks)
        trainer._restore(payload, path)
        return trainer

    def _checkpoint_payload(self) -> dict:
        progress = None if self._progress is None else dict(vars(self._progress))
        # Between sequences the next begin() resets the engine, so its state is not needed.
        engine_state = None if self._progress is None else self.engine.state_dict()
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": model_section(self.model),
            "optimizer": {"class": type(self.optimizer).__name__,
                          "state": self.optimizer.state_dict()},
            "config": config_dict(self.config),
            "task": describe_task(self.task),
            "engine": {"method": self.engine.method, "state": engine_state},
            "trainer": {"updates": self.updates, "skipped": self.skipped,
                        "rows": [dict(row) for row in self.rows], "progress": progress},
            "rng": capture_rng(self.generator),
        }

    def _restore(self, payload: dict, path: str | os.PathLike) -> None:
        """Load the optimizer, engine, position and generator states of a checkpoint."""
        saved_optimizer = payload["optimizer"].get("class")
        if saved_optimizer != type(self.optimizer).__name__:
            raise CheckpointError(f"checkpoint optimizer {saved_optimizer} does not match "
                                  f"{type(self.optimizer).__name__}")
        try:
            self.optimizer.load_state_dict(payload["optimizer"]["state"])
            if payload["engine"]["state"] is not None:
                self.engine.load_state_dict(payload["engine"]["state"])
            self._restore_position(payload["trainer"])
            restore_rng(payload["rng"], self.generator)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this trainer: "
                                  f"{type(error).__name__}: {error}") from error

        self._saved_position = self._position()
        logger.info("resumed from checkpoint %s at update %d (sequence %d, step %d)", path,
                    self.updates, len(self.rows), self._progress.step if self._progress else 0)

    def _restore_position(self, saved: dict) -> None:
        self.updates, self.skipped = int(saved["updates"]), int(saved["skipped"])
        self.rows = [dict(row) for row in saved["rows"]]
        self._progress = None
        if saved["progress"] is not None:
            weight = next(self.model.parameters())
            progress = _Progress(**saved["progress"])
            progress.inputs = progress.inputs.to(weight.device)
            progress.targets = validate_sequence(self.model, progress.inputs,
                                                 progress.targets.to(weight.device))
            self._progress = progress

    def _position(self) -> tuple[int, int, int]:
        return self.updates, len(self.rows), self._progress.step if self._progress else 0

    def _checkpoint_once(self, path: Path) -> None:
        """Write a checkpoint unless one was written or loaded at this position."""
        if self._saved_position != self._position():
            self.save_checkpoint(path)

    def _train_sequence(self, plan: _RunPlan) -> bool:
        """Train until the sequence ends or ``plan`` stops at an update; return True if stopped."""
        if self._progress is None:
            self._progress = self._start_sequence()
        progress = self._progress
        every, steps = self.config.update_every, progress.inputs.shape[1]
        try:
            while progress.step < steps:
                self._take_step(progress)
                if every is not None and progress.step % every == 0 and progress.step < steps:
                    self._timed_update(progress)
                    if self._after_update(plan):
                        return True
            self._timed_update(progress)
            updated = True
        except NonFiniteError as error:
            if self.config.on_nonfinite == "raise":
                # The engine state is broken, so a later run must not continue this sequence.
                self._progress = None
                self.optimizer.zero_grad(set_to_none=True)
                raise
            self._skip(error)
            updated = False

        self._finish_sequence(progress)
        return updated and self._after_update(plan)

    def _start_sequence(self) -> _Progress:
        """Sample a batch and begin the engine on it."""
        weight = next(self.model.parameters())
        batch = self.task.sample(self.config.batch_size, self.generator).to(weight.dtype,
                                                                             weight.device)
        targets = validate_sequence(self.model, batch.inputs, batch.targets)
        progress = _Progress(batch.inputs, targets)
        start = time.perf_counter()
        self.engine.begin(batch.inputs.shape[0])
        progress.elapsed += time.perf_counter() - start
        return progress

    def _take_step(self, progress: _Progress) -> None:
        start = time.perf_counter()
        t = progress.step
        record = self.engine.step(progress.inputs[:, t], progress.targets[:, t])
        if record.loss is not None:
            mask = progress.targets[:, t] != IGNORE_INDEX
            progress.loss += record.loss
            progress.correct += int((record.logits[mask].argmax(-1)
                                     == progress.targets[mask, t]).sum())
            progress.counted += int(mask.sum())
        progress.step += 1
        progress.elapsed += time.perf_counter() - start

    def _timed_update(self, progress: _Progress) -> None:
        start = time.perf_counter()
        self._update()
        progress.elapsed += time.perf_counter() - start

    def _after_update(self, plan: _RunPlan) -> bool:
        """Write a checkpoint if one is due; return True if the run should stop."""
        if plan.checkpoint_due(self.updates):
            self.save_checkpoint(plan.path)
        return plan.should_stop(self.updates)

    def _skip(self, error: NonFiniteError) -> None:
        """Discard the pending update and abandon the rest of the sequence."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        logger.warning("skipped the update in sequence %d and abandoned the rest of the sequence "
                       "(%d skipped so far): %s", len(self.rows), self.skipped, error)

    def _finish_sequence(self, progress: _Progress) -> None:
        row = {
            "sequence": len(self.rows),
            "loss": progress.loss,
            "accuracy": progress.correct / progress.counted if progress.counted else float("nan"),
            "updates": self.updates,
            "skipped": self.skipped,
            "steps": progress.inputs.shape[1],
            "wall_time": progress.elapsed,
        }
        self.rows.append(row)
        self._progress = None
        for callback in self.callbacks:
            callback(row)

    def _update(self) -> None:
        """Apply the gradient accumulated since the last update.

        Raises NonFiniteError, before any parameter changes, if the gradient
        or its norm is not finite.
        """
        gradients = self.engine.take_gradients()
        self._check_gradients(gradients)
        params = dict(self.model.named_parameters())
        for name, grad in gradients.items():
            params[name].grad = grad
        if self.config.clip_norm is not None:
            self._clip(params.values())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def _check_gradients(self, gradients: dict[str, Tensor]) -> None:
        groups = _nonfinite_groups(gradients)
        if groups:
            raise NonFiniteError(step=self.engine.time - 1, method=self.config.method,
                                 what="gradient", group=groups)

    def _clip(self, params: Iterable[Tensor]) -> None:
        # The entries are finite here, but the norm can still overflow.
        try:
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm, error_if_nonfinite=True)
        except RuntimeError as error:
            if "non-finite" not in str(error):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(step=self.engine.time - 1, method=self.config.method,
                                 what="gradient norm", group="all parameters") from error

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
