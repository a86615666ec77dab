"""Tests for the synthetic sequence tasks in rtrl_moe.tasks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtrl_moe.tasks import (
    IGNORE_INDEX,
    TASKS,
    AnBn,
    Haystack,
    RandomOneHot,
    SequenceBatch,
    task_from_name,
)

A_INDEX = 0
B_INDEX = 1


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def real_step_mask(batch: SequenceBatch) -> torch.Tensor:
    positions = torch.arange(batch.n_steps).unsqueeze(0)
    return positions < batch.lengths.unsqueeze(1)


def assert_batch_layout(batch: SequenceBatch, d_in: int, batch_size: int) -> None:
    """Check shapes, dtypes, one-hot real steps, zero padding and target placement."""
    assert batch.inputs.shape == (batch_size, batch.n_steps, d_in)
    assert batch.targets.shape == (batch_size, batch.n_steps)
    assert batch.lengths.shape == (batch_size,)
    assert batch.inputs.dtype == torch.float32
    assert batch.targets.dtype == torch.long
    assert batch.lengths.dtype == torch.long
    assert batch.n_steps == int(batch.lengths.max())

    real = real_step_mask(batch)
    row_sums = batch.inputs.sum(dim=-1)
    assert torch.all(row_sums[real] == 1)
    assert torch.all(batch.inputs[real].max(dim=-1).values == 1)
    assert torch.all(batch.inputs[~real] == 0)

    last_step = torch.zeros_like(real)
    last_step[torch.arange(batch_size), batch.lengths - 1] = True
    assert torch.all(batch.targets[~last_step] == IGNORE_INDEX)
    assert torch.all(batch.targets[last_step] != IGNORE_INDEX)


def count_anbn(batch: SequenceBatch, row: int) -> tuple[int, int]:
    """Return the counts of a and b in one sample, checking that all a's come first."""
    tokens = batch.inputs[row, : int(batch.lengths[row])].argmax(dim=-1).tolist()
    n_a = tokens.count(A_INDEX)
    n_b = tokens.count(B_INDEX)
    assert tokens == [A_INDEX] * n_a + [B_INDEX] * n_b
    return n_a, n_b


def check_anbn_batch(task: AnBn, batch: SequenceBatch, batch_size: int) -> None:
    assert_batch_layout(batch, task.d_in, batch_size)
    assert batch.n_steps <= task.max_length

    for row in range(batch_size):
        n_a, n_b = count_anbn(batch, row)
        label = int(batch.targets[row, n_a + n_b - 1])
        assert task.n_min <= n_a <= task.n_max
        assert task.n_min <= n_b <= task.n_max
        assert int(batch.lengths[row]) == n_a + n_b
        assert label == int(n_a == n_b)


def check_haystack_batch(task: Haystack, batch: SequenceBatch, batch_size: int) -> None:
    assert_batch_layout(batch, task.d_in, batch_size)
    assert batch.n_steps == task.length
    assert torch.all(batch.lengths == task.length)

    tokens = batch.inputs.argmax(dim=-1)
    for row in range(batch_size):
        marker_positions = (tokens[row] == task.marker_token).nonzero().flatten()
        assert marker_positions.numel() == 1

        marker = int(marker_positions[0])
        value = int(tokens[row, marker + 1]) - task.first_value_token
        assert 0 <= marker <= task.length - 3
        assert 0 <= value < task.n_values
        assert int(tokens[row, -1]) == task.query_token
        assert int(batch.targets[row, -1]) == value

        other = torch.ones(task.length, dtype=torch.bool)
        other[[marker, marker + 1, task.length - 1]] = False
        assert torch.all(tokens[row, other] < task.n_distractors)


def assert_batches_equal(first: SequenceBatch, second: SequenceBatch) -> None:
    assert torch.equal(first.inputs, second.inputs)
    assert torch.equal(first.targets, second.targets)
    assert torch.equal(first.lengths, second.lengths)


ALL_TASKS = [
    AnBn(),
    AnBn(n_min=4, n_max=6),
    Haystack(),
    Haystack(length=3, n_values=2, n_distractors=1),
    RandomOneHot(d_in=5, length=7, d_out=3),
]


# SequenceBatch


def test_sequence_batch_to_converts_dtype() -> None:
    batch = AnBn().sample(8, make_generator(0))
    converted = batch.to(dtype=torch.float64, device="cpu")

    assert converted.inputs.dtype == torch.float64
    assert converted.targets.dtype == torch.long
    assert converted.lengths.dtype == torch.long
    assert torch.equal(converted.inputs, batch.inputs.double())
    assert torch.equal(converted.targets, batch.targets)
    assert torch.equal(converted.lengths, batch.lengths)
    assert batch.inputs.dtype == torch.float32


def test_sequence_batch_to_without_arguments() -> None:
    batch = Haystack().sample(4, make_generator(0))
    assert_batches_equal(batch.to(), batch)


def test_sequence_batch_to_rejects_integer_dtype() -> None:
    batch = AnBn().sample(2, make_generator(0))
    with pytest.raises(ValueError, match="dtype"):
        batch.to(dtype=torch.long)


def test_sequence_batch_is_frozen() -> None:
    batch = AnBn().sample(2, make_generator(0))
    with pytest.raises(AttributeError):
        batch.inputs = batch.inputs  # type: ignore[misc]


@pytest.mark.parametrize(
    ("inputs", "targets", "lengths", "field"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), "inputs"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2), "targets"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(3), "lengths"),
    ],
)
def test_sequence_batch_rejects_bad_shapes(
    inputs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        SequenceBatch(inputs=inputs, targets=targets.long(), lengths=lengths.long())


# Shared behaviour of all tasks


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_batch_layout(task: Any) -> None:
    batch = task.sample(16, make_generator(1))
    if isinstance(task, RandomOneHot):
        assert batch.inputs.shape == (16, task.length, task.d_in)
        assert torch.all(batch.inputs.sum(dim=-1) == 1)
        return
    assert_batch_layout(batch, task.d_in, 16)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_same_seed_same_batch(task: Any) -> None:
    first = task.sample(32, make_generator(123))
    second = task.sample(32, make_generator(123))
    assert_batches_equal(first, second)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_different_seeds_differ(task: Any) -> None:
    first = task.sample(64, make_generator(1))
    second = task.sample(64, make_generator(2))
    assert not torch.equal(first.inputs, second.inputs)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_default_generator_follows_manual_seed(task: Any) -> None:
    torch.manual_seed(7)
    first = task.sample(16)
    torch.manual_seed(7)
    second = task.sample(16)
    assert_batches_equal(first, second)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_batch_size_one(task: Any) -> None:
    batch = task.sample(1, make_generator(0))
    assert batch.batch_size == 1
    assert batch.n_steps == int(batch.lengths[0])


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0, "4", None])
def test_task_rejects_invalid_batch_size(task: Any, batch_size: Any) -> None:
    with pytest.raises(ValueError, match=rf"batch_size .*got {batch_size!r}"):
        task.sample(batch_size, make_generator(0))


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_task_rejects_non_generator(task: Any) -> None:
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        task.sample(4, 0)


# AnBn


@pytest.mark.parametrize(("n_min", "n_max"), [(1, 2), (1, 3), (4, 6), (2, 9)])
def test_anbn_labels_match_counts(n_min: int, n_max: int) -> None:
    task = AnBn(n_min=n_min, n_max=n_max)
    batch = task.sample(256, make_generator(3))
    check_anbn_batch(task, batch, 256)


def test_anbn_attributes() -> None:
    task = AnBn(n_min=2, n_max=5)
    assert task.d_in == 2
    assert task.d_out == 2
    assert task.name == "anbn"
    assert task.max_length == 10


def test_anbn_labels_roughly_balanced() -> None:
    batch = AnBn().sample(4000, make_generator(0))
    labels = batch.targets[torch.arange(4000), batch.lengths - 1]
    positive_fraction = labels.float().mean().item()
    assert 0.4 < positive_fraction < 0.6


@pytest.mark.parametrize(("n_min", "n_max"), [(1, 3), (4, 6)])
def test_anbn_covers_whole_n_range(n_min: int, n_max: int) -> None:
    task = AnBn(n_min=n_min, n_max=n_max)
    batch = task.sample(2000, make_generator(5))
    n_a = batch.inputs[:, :, A_INDEX].sum(dim=1).long()
    n_b = batch.inputs[:, :, B_INDEX].sum(dim=1).long()

    expected = set(range(n_min, n_max + 1))
    assert set(n_a.tolist()) == expected
    assert set(n_b.tolist()) == expected


def test_anbn_negative_b_count_excludes_n() -> None:
    task = AnBn(n_min=1, n_max=2)
    batch = task.sample(500, make_generator(9))
    labels = batch.targets[torch.arange(500), batch.lengths - 1]
    n_a = batch.inputs[:, :, A_INDEX].sum(dim=1).long()
    n_b = batch.inputs[:, :, B_INDEX].sum(dim=1).long()

    negative = labels == 0
    assert negative.any()
    assert torch.all(n_b[negative] == 3 - n_a[negative])


def test_anbn_held_out_lengths_exceed_training() -> None:
    train = AnBn(n_min=1, n_max=3).sample(500, make_generator(0))
    held_out = AnBn(n_min=4, n_max=6).sample(500, make_generator(0))
    assert int(train.lengths.max()) <= 6
    assert int(held_out.lengths.min()) >= 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_min": 0}, "n_min must be an int >= 1, got 0"),
        ({"n_min": -1}, "n_min must be an int >= 1, got -1"),
        ({"n_min": True}, "n_min must be an int >= 1, got True"),
        ({"n_min": 1.0}, "n_min must be an int >= 1, got 1.0"),
        ({"n_min": "1"}, "n_min must be an int >= 1, got '1'"),
        ({"n_max": 0}, "n_max must be an int >= 1, got 0"),
        ({"n_max": False}, "n_max must be an int >= 1, got False"),
        ({"n_max": 3.5}, "n_max must be an int >= 1, got 3.5"),
        ({"n_min": 3, "n_max": 2}, "n_max must be > n_min .*n_min=3, n_max=2"),
        ({"n_min": 2, "n_max": 2}, "n_max must be > n_min .*n_min=2, n_max=2"),
        ({"n_min": 4}, "n_max must be > n_min .*n_min=4, n_max=3"),
    ],
)
def test_anbn_rejects_invalid_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnBn(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    n_min=st.integers(min_value=1, max_value=6),
    n_extra=st.integers(min_value=1, max_value=5),
    batch_size=st.integers(min_value=1, max_value=24),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_anbn_property(n_min: int, n_extra: int, batch_size: int, seed: int) -> None:
    task = AnBn(n_min=n_min, n_max=n_min + n_extra)
    batch = task.sample(batch_size, make_generator(seed))
    check_anbn_batch(task, batch, batch_size)


# Haystack


def test_haystack_attributes() -> None:
    task = Haystack(length=10, n_values=3, n_distractors=5)
    assert task.d_in == 10
    assert task.d_out == 3
    assert task.name == "haystack"
    assert task.max_length == 10
    assert task.marker_token == 5
    assert task.first_value_token == 6
    assert task.query_token == 9


@pytest.mark.parametrize(
    "task",
    [Haystack(), Haystack(length=3, n_values=2, n_distractors=1), Haystack(length=40)],
    ids=repr,
)
def test_haystack_structure(task: Haystack) -> None:
    batch = task.sample(128, make_generator(4))
    check_haystack_batch(task, batch, 128)


def test_haystack_covers_positions_and_values() -> None:
    task = Haystack(length=6, n_values=3, n_distractors=2)
    batch = task.sample(1000, make_generator(8))
    tokens = batch.inputs.argmax(dim=-1)
    marker_positions = (tokens == task.marker_token).float().argmax(dim=1)

    assert set(marker_positions.tolist()) == set(range(task.length - 2))
    assert set(batch.targets[:, -1].tolist()) == set(range(task.n_values))


def test_haystack_length_three_has_no_distractors() -> None:
    task = Haystack(length=3, n_values=2, n_distractors=4)
    batch = task.sample(16, make_generator(0))
    tokens = batch.inputs.argmax(dim=-1)
    assert torch.all(tokens[:, 0] == task.marker_token)
    assert torch.all(tokens[:, 2] == task.query_token)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 2}, "length must be an int >= 3 to fit .*got 2"),
        ({"length": 0}, "length must be an int >= 3 .*got 0"),
        ({"length": -5}, "length must be an int >= 3 .*got -5"),
        ({"length": True}, "length must be an int >= 3 .*got True"),
        ({"length": 16.0}, "length must be an int >= 3 .*got 16.0"),
        ({"n_values": 1}, "n_values must be an int >= 2, got 1"),
        ({"n_values": 0}, "n_values must be an int >= 2, got 0"),
        ({"n_values": True}, "n_values must be an int >= 2, got True"),
        ({"n_values": 4.0}, "n_values must be an int >= 2, got 4.0"),
        ({"n_distractors": 0}, "n_distractors must be an int >= 1, got 0"),
        ({"n_distractors": -1}, "n_distractors must be an int >= 1, got -1"),
        ({"n_distractors": False}, "n_distractors must be an int >= 1, got False"),
        ({"n_distractors": None}, "n_distractors must be an int >= 1, got None"),
    ],
)
def test_haystack_rejects_invalid_arguments(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Haystack(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(min_value=3, max_value=30),
    n_values=st.integers(min_value=2, max_value=8),
    n_distractors=st.integers(min_value=1, max_value=8),
    batch_size=st.integers(min_value=1, max_value=16),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_haystack_property(
    length: int, n_values: int, n_distractors: int, batch_size: int, seed: int
) -> None:
    task = Haystack(length=length, n_values=n_values, n_distractors=n_distractors)
    batch = task.sample(batch_size, make_generator(seed))
    check_haystack_batch(task, batch, batch_size)


# RandomOneHot


def test_random_onehot_batch() -> None:
    task = RandomOneHot(d_in=6, length=9)
    batch = task.sample(20, make_generator(0))

    assert task.d_out is None
    assert task.name == "random_onehot"
    assert task.max_length == 9
    assert batch.inputs.shape == (20, 9, 6)
    assert batch.inputs.dtype == torch.float32
    assert torch.all(batch.inputs.sum(dim=-1) == 1)
    assert torch.all(batch.targets == IGNORE_INDEX)
    assert torch.all(batch.lengths == 9)


def test_random_onehot_uses_every_input() -> None:
    batch = RandomOneHot(d_in=4, length=50).sample(10, make_generator(0))
    assert torch.all(batch.inputs.sum(dim=(0, 1)) > 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_in": 0, "length": 4}, "d_in must be an int >= 1, got 0"),
        ({"d_in": True, "length": 4}, "d_in must be an int >= 1, got True"),
        ({"d_in": 2.0, "length": 4}, "d_in must be an int >= 1, got 2.0"),
        ({"d_in": 3, "length": 0}, "length must be an int >= 1, got 0"),
        ({"d_in": 3, "length": -2}, "length must be an int >= 1, got -2"),
        ({"d_in": 3, "length": False}, "length must be an int >= 1, got False"),
        ({"d_in": 3, "length": 4, "d_out": 0}, "d_out must be an int >= 1 or None"),
        ({"d_in": 3, "length": 4, "d_out": True}, "d_out .*got True"),
        ({"d_in": 3, "length": 4, "d_out": 1.5}, "d_out .*got 1.5"),
    ],
)
def test_random_onehot_rejects_invalid_arguments(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RandomOneHot(**kwargs)


# task_from_name


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("anbn", {"n_min": 4, "n_max": 6}, AnBn(n_min=4, n_max=6)),
        ("haystack", {"length": 5}, Haystack(length=5)),
        ("random_onehot", {"d_in": 3, "length": 4}, RandomOneHot(d_in=3, length=4)),
    ],
)
def test_task_from_name_builds_task(
    name: str, kwargs: dict[str, Any], expected: Any
) -> None:
    task = task_from_name(name, **kwargs)
    assert task == expected
    assert task.name == name


def test_task_registry_names() -> None:
    assert set(TASKS) == {"anbn", "haystack", "random_onehot"}


@pytest.mark.parametrize("name", ["copy", "AnBn", "", None, 3])
def test_task_from_name_rejects_unknown(name: Any) -> None:
    with pytest.raises(ValueError) as error:
        task_from_name(name)

    message = str(error.value)
    assert repr(name) in message
    for known_name in ("anbn", "haystack", "random_onehot"):
        assert repr(known_name) in message


def test_task_from_name_passes_validation_errors() -> None:
    with pytest.raises(ValueError, match="n_max must be > n_min"):
        task_from_name("anbn", n_min=3, n_max=3)
