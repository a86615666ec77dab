"""Synthetic sequence tasks generated on the fly.

Every task draws all of its randomness from a ``torch.Generator``, so the same
seed gives bitwise identical batches. A batch is a :class:`SequenceBatch` of
one-hot inputs and per-step targets, where ``IGNORE_INDEX`` marks the steps
without a loss (the default ``ignore_index`` of ``torch.nn.CrossEntropyLoss``).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "AnBn",
    "Haystack",
    "RandomOneHot",
    "SequenceBatch",
    "TASKS",
    "task_from_name",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceBatch:
    """Batch of padded one-hot sequences with sparse targets.

    Attributes
    ----------
    inputs : torch.Tensor
        Float tensor of shape (B, T, d_in). Each real step is a one-hot row and
        each padding step after the end of a sample is an all-zero row.
    targets : torch.Tensor
        Long tensor of shape (B, T) with the class label at each step where a
        loss is taken and ``IGNORE_INDEX`` at every other step, padding included.
    lengths : torch.Tensor
        Long tensor of shape (B,) with the real length of each sample.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.dim() != 3:
            raise ValueError(
                "inputs must have shape (B, T, d_in), "
                f"got shape {tuple(self.inputs.shape)}"
            )

        batch_size, n_steps = self.inputs.shape[:2]
        if tuple(self.targets.shape) != (batch_size, n_steps):
            raise ValueError(
                f"targets must have shape {(batch_size, n_steps)} to match inputs, "
                f"got shape {tuple(self.targets.shape)}"
            )

        if tuple(self.lengths.shape) != (batch_size,):
            raise ValueError(
                f"lengths must have shape {(batch_size,)} to match inputs, "
                f"got shape {tuple(self.lengths.shape)}"
            )

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return self.inputs.shape[0]

    @property
    def n_steps(self) -> int:
        """Padded sequence length T."""
        return self.inputs.shape[1]

    def to(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> SequenceBatch:
        """Return a new batch with the tensors converted.

        ``dtype`` applies to ``inputs`` only and must be a floating point type,
        else ValueError is raised. ``device`` applies to all three tensors. As
        with ``torch.Tensor.to``, a tensor that needs no conversion is shared.
        """
        if dtype is not None and not (
            isinstance(dtype, torch.dtype) and dtype.is_floating_point
        ):
            raise ValueError(
                f"dtype must be a floating point torch.dtype or None, got {dtype!r}"
            )

        return SequenceBatch(
            inputs=self.inputs.to(device=device, dtype=dtype),
            targets=self.targets.to(device=device),
            lengths=self.lengths.to(device=device),
        )


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, reason: str = "") -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an int >= minimum."""
    if not _is_int(value) or value < minimum:
        raise ValueError(
            f"{name} must be an int >= {minimum}{reason}, got {_describe(value)}"
        )
    return int(value)


def _normalize_int_field(task: Any, name: str, minimum: int, reason: str = "") -> None:
    value = _check_int(name, getattr(task, name), minimum, reason)
    object.__setattr__(task, name, value)


def _check_sample_arguments(
    batch_size: Any, generator: torch.Generator | None
) -> torch.device:
    """Validate the arguments of ``sample`` and return the device to draw on.

    Batches are drawn on the device of ``generator``, or on the CPU when it is None.
    NOTE: the tests cover CPU generators only.
    """
    _check_int("batch_size", batch_size, 1)

    if generator is None:
        return torch.device("cpu")

    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {_describe(generator)}"
        )
    return generator.device


def _ignore_targets(
    batch_size: int, n_steps: int, device: torch.device
) -> torch.Tensor:
    return torch.full(
        (batch_size, n_steps), IGNORE_INDEX, dtype=torch.long, device=device
    )


@dataclass(frozen=True)
class AnBn:
    """Classification of a^n b^n against a^n b^m with m != n.

    Inputs are one-hot over {a, b} (index 0 is a, index 1 is b). The count n is
    uniform over ``n_min..n_max``. With probability 1/2 a sample is a^n b^n
    (label 1), otherwise it is a^n b^m (label 0) with m uniform over
    ``n_min..n_max`` excluding n. The label sits at the last real step of the
    sample, and shorter samples are padded to the longest one in the batch.

    Parameters
    ----------
    n_min, n_max : int
        Inclusive range of n, with ``1 <= n_min < n_max``. A separate range,
        for example ``n_min=4, n_max=6``, gives held-out lengths.
    """

    n_min: int = 1
    n_max: int = 3

    name: ClassVar[str] = "anbn"
    d_in: ClassVar[int] = 2
    d_out: ClassVar[int] = 2

    def __post_init__(self) -> None:
        _normalize_int_field(self, "n_min", 1)
        _normalize_int_field(self, "n_max", 1)

        if self.n_max <= self.n_min:
            raise ValueError(
                "n_max must be > n_min so that the negative class can draw "
                f"m != n from the same range, got n_min={self.n_min}, n_max={self.n_max}"
            )

    @property
    def max_length(self) -> int:
        """Maximum sample length, 2 * n_max."""
        return 2 * self.n_max

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> SequenceBatch:
        """Draw a batch of ``batch_size`` samples from ``generator``."""
        device = _check_sample_arguments(batch_size, generator)
        draw = {"generator": generator, "device": device}

        n_a = torch.randint(self.n_min, self.n_max + 1, (batch_size,), **draw)
        labels = torch.randint(0, 2, (batch_size,), **draw)

        # Draw m from the range with n removed, then shift the values >= n up by one.
        m = torch.randint(self.n_min, self.n_max, (batch_size,), **draw)
        m = m + (m >= n_a).long()
        n_b = torch.where(labels == 1, n_a, m)

        lengths = n_a + n_b
        n_steps = int(lengths.max())
        positions = torch.arange(n_steps, device=device).unsqueeze(0)

        inputs = torch.zeros(batch_size, n_steps, self.d_in, device=device)
        inputs[:, :, 0] = (positions < n_a.unsqueeze(1)).float()
        inputs[:, :, 1] = (
            (positions >= n_a.unsqueeze(1)) & (positions < lengths.unsqueeze(1))
        ).float()

        targets = _ignore_targets(batch_size, n_steps, device)
        rows = torch.arange(batch_size, device=device)
        targets[rows, lengths - 1] = labels

        return SequenceBatch(inputs=inputs, targets=targets, lengths=lengths)


@dataclass(frozen=True)
class Haystack:
    """Retrieval of the value that follows a key marker among distractors.

    A sample has exactly ``length`` steps. The key marker sits at a uniformly
    random position p in ``0..length-3``, a value token (uniform over the
    ``n_values`` values) at p + 1 and the query token at the last position.
    Every other position is a uniformly random distractor. The target at the
    last step is the value index, and no other step has a target.

    Token indices, which are also the one-hot input indices:

    - ``0 .. n_distractors-1``: distractors
    - ``n_distractors``: key marker
    - ``n_distractors+1 .. n_distractors+n_values``: values 0 .. n_values-1
    - ``n_distractors+n_values+1``: query

    Parameters
    ----------
    length : int
        Number of steps, at least 3 (marker, value and query).
    n_values : int
        Number of value tokens and output classes, at least 2.
    n_distractors : int
        Number of distractor tokens, at least 1.
    """

    length: int = 16
    n_values: int = 4
    n_distractors: int = 8

    name: ClassVar[str] = "haystack"

    def __post_init__(self) -> None:
        _normalize_int_field(
            self, "length", 3, " to fit the key marker, the value and the query"
        )
        _normalize_int_field(self, "n_values", 2)
        _normalize_int_field(self, "n_distractors", 1)

    @property
    def d_in(self) -> int:
        """Input size, n_distractors + n_values + 2."""
        return self.n_distractors + self.n_values + 2

    @property
    def d_out(self) -> int:
        """Number of output classes, n_values."""
        return self.n_values

    @property
    def marker_token(self) -> int:
        """Index of the key marker token."""
        return self.n_distractors

    @property
    def first_value_token(self) -> int:
        """Index of the token for value 0."""
        return self.n_distractors + 1

    @property
    def query_token(self) -> int:
        """Index of the query token."""
        return self.n_distractors + self.n_values + 1

    @property
    def max_length(self) -> int:
        """Maximum sample length, equal to ``length``."""
        return self.length

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> SequenceBatch:
        """Draw a batch of ``batch_size`` samples from ``generator``."""
        device = _check_sample_arguments(batch_size, generator)
        draw = {"generator": generator, "device": device}
        shape = (batch_size, self.length)

        tokens = torch.randint(0, self.n_distractors, shape, **draw)
        marker_positions = torch.randint(0, self.length - 2, (batch_size,), **draw)
        values = torch.randint(0, self.n_values, (batch_size,), **draw)

        rows = torch.arange(batch_size, device=device)
        tokens[rows, marker_positions] = self.marker_token
        tokens[rows, marker_positions + 1] = self.first_value_token + values
        tokens[:, -1] = self.query_token
        inputs = F.one_hot(tokens, self.d_in).float()

        targets = _ignore_targets(batch_size, self.length, device)
        targets[:, -1] = values

        lengths = torch.full((batch_size,), self.length, dtype=torch.long, device=device)
        return SequenceBatch(inputs=inputs, targets=targets, lengths=lengths)


@dataclass(frozen=True)
class RandomOneHot:
    """Uniformly random one-hot inputs without targets, for speed benchmarks.

    Parameters
    ----------
    d_in : int
        Input size, at least 1.
    length : int
        Number of steps, at least 1.
    d_out : int or None
        Output size reported to the model, at least 1, or None. The batches
        carry no targets whatever its value.
    """

    d_in: int
    length: int
    d_out: int | None = None

    name: ClassVar[str] = "random_onehot"

    def __post_init__(self) -> None:
        _normalize_int_field(self, "d_in", 1)
        _normalize_int_field(self, "length", 1)

        if self.d_out is not None:
            _normalize_int_field(self, "d_out", 1, " or None")

    @property
    def max_length(self) -> int:
        """Maximum sample length, equal to ``length``."""
        return self.length

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> SequenceBatch:
        """Draw a batch of ``batch_size`` samples from ``generator``."""
        device = _check_sample_arguments(batch_size, generator)
        shape = (batch_size, self.length)

        tokens = torch.randint(0, self.d_in, shape, generator=generator, device=device)
        inputs = F.one_hot(tokens, self.d_in).float()

        targets = _ignore_targets(batch_size, self.length, device)
        lengths = torch.full((batch_size,), self.length, dtype=torch.long, device=device)
        return SequenceBatch(inputs=inputs, targets=targets, lengths=lengths)


TASKS: dict[str, type] = {task.name: task for task in (AnBn, Haystack, RandomOneHot)}


def task_from_name(name: str, **kwargs: Any) -> AnBn | Haystack | RandomOneHot:
    """Build the task registered under ``name`` with keyword arguments ``kwargs``."""
    if not isinstance(name, str) or name not in TASKS:
        known = ", ".join(repr(known_name) for known_name in TASKS)
        raise ValueError(f"unknown task name {name!r}, expected one of {known}")

    return TASKS[name](**kwargs)
