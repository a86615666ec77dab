"""Tests for CircularSegmentTree against a naive left-to-right fold."""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtrl_moe.tree import CircularSegmentTree

CAPACITIES = [1, 2, 3, 5, 8]
FAST = settings(max_examples=40, deadline=None)


def concat(earlier: str, later: str) -> str:
    return earlier + later


def matmul_combine(earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    return later @ earlier


def naive_fold(items, combine, identity):
    return reduce(combine, items, identity)


def random_matrices(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 3)) / math.sqrt(3) for _ in range(count)]


class CountingConcat:
    """String concatenation that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, earlier: str, later: str) -> str:
        self.calls += 1
        return earlier + later


@st.composite
def capacity_and_push_count(draw):
    capacity = draw(st.sampled_from(CAPACITIES))
    push_count = draw(st.integers(min_value=0, max_value=3 * capacity + 2))
    return capacity, push_count


@FAST
@given(setup=capacity_and_push_count(), seed=st.integers(0, 2**32 - 1))
def test_matrix_ranges_match_naive_fold(setup, seed):
    capacity, push_count = setup
    identity = np.eye(3)
    tree = CircularSegmentTree(capacity, matmul_combine, identity)
    window: list[np.ndarray] = []

    for matrix in random_matrices(seed, push_count):
        tree.push(matrix)
        window = (window + [matrix])[-capacity:]
        assert len(tree) == len(window)

        for start in range(len(window) + 1):
            for stop in range(start, len(window) + 1):
                expected = naive_fold(window[start:stop], matmul_combine, identity)
                actual = tree.query(start, stop)
                assert np.allclose(actual, expected, rtol=1e-12, atol=1e-12), (
                    f"capacity={capacity} range=({start}, {stop})"
                )


@FAST
@given(setup=capacity_and_push_count())
def test_string_ranges_match_naive_fold(setup):
    capacity, push_count = setup
    tree = CircularSegmentTree(capacity, concat, "")
    window: list[str] = []

    for k in range(push_count):
        item = f"<{k}>"
        tree.push(item)
        window = (window + [item])[-capacity:]
        assert len(tree) == len(window)
        assert tree.total_pushed == k + 1

        for start in range(len(window) + 1):
            for stop in range(start, len(window) + 1):
                assert tree.query(start, stop) == "".join(window[start:stop])


def test_string_ranges_all_small_capacities():
    # Non-powers of two are where a bottom-up tree can lose the order of a
    # non-commutative fold, so check every capacity up to 40 exhaustively.
    for capacity in range(1, 41):
        tree = CircularSegmentTree(capacity, concat, "")
        window: list[str] = []
        for k in range(2 * capacity + 3):
            item = f"<{k}>"
            tree.push(item)
            window = (window + [item])[-capacity:]

            for start in range(len(window) + 1):
                for stop in range(start, len(window) + 1):
                    expected = "".join(window[start:stop])
                    assert tree.query(start, stop) == expected, (
                        f"capacity={capacity} pushes={k + 1} range=({start}, {stop})"
                    )


def test_torch_matrix_full_window():
    generator = torch.Generator().manual_seed(0)
    identity = torch.eye(4, dtype=torch.float64)
    tree = CircularSegmentTree(6, matmul_combine, identity)
    matrices = [
        torch.randn(4, 4, dtype=torch.float64, generator=generator) / 2
        for _ in range(15)
    ]
    for matrix in matrices:
        tree.push(matrix)

    expected = naive_fold(matrices[-6:], matmul_combine, identity)
    assert torch.allclose(tree.query(0, 6), expected, rtol=1e-12, atol=1e-12)


def test_empty_range_returns_identity():
    identity = np.eye(3)
    tree = CircularSegmentTree(4, matmul_combine, identity)
    assert tree.query(0, 0) is identity

    for matrix in random_matrices(1, 6):
        tree.push(matrix)
    for position in range(len(tree) + 1):
        assert tree.query(position, position) is identity


def test_items_not_mutated():
    matrices = random_matrices(2, 9)
    originals = [matrix.copy() for matrix in matrices]
    tree = CircularSegmentTree(4, matmul_combine, np.eye(3))

    for matrix in matrices:
        tree.push(matrix)
        tree.query(0, len(tree))
        tree.query(1, len(tree))

    for matrix, original in zip(matrices, originals):
        assert np.array_equal(matrix, original)


def test_getitem_positive_and_negative():
    tree = CircularSegmentTree(3, concat, "")
    for item in ["a", "b", "c", "d", "e"]:
        tree.push(item)

    assert [tree[i] for i in range(3)] == ["c", "d", "e"]
    assert tree[-1] == "e"
    assert tree[-2] == "d"
    assert tree[-3] == "c"


def test_getitem_returns_pushed_object():
    matrix = np.eye(2)
    tree = CircularSegmentTree(2, matmul_combine, np.eye(2))
    tree.push(matrix)
    assert tree[0] is matrix


@pytest.mark.parametrize("index", [3, -4, 100])
def test_getitem_out_of_range(index):
    tree = CircularSegmentTree(5, concat, "")
    for item in "abc":
        tree.push(item)
    with pytest.raises(IndexError):
        tree[index]


def test_getitem_empty_tree():
    tree = CircularSegmentTree(2, concat, "")
    with pytest.raises(IndexError):
        tree[0]
    with pytest.raises(IndexError):
        tree[-1]


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True, "3", None])
def test_invalid_capacity_raises(capacity):
    with pytest.raises(ValueError, match="capacity"):
        CircularSegmentTree(capacity, concat, "")


def test_numpy_integer_capacity_accepted():
    tree = CircularSegmentTree(np.int64(3), concat, "")
    assert tree.capacity == 3
    assert type(tree.capacity) is int


@pytest.mark.parametrize("start, stop", [(-1, 2), (2, 1), (0, 4), (4, 4), (3, 5)])
def test_invalid_range_raises(start, stop):
    tree = CircularSegmentTree(5, concat, "")
    for item in "abc":
        tree.push(item)
    with pytest.raises(ValueError) as excinfo:
        tree.query(start, stop)

    message = str(excinfo.value)
    assert f"start={start}" in message
    assert f"stop={stop}" in message
    assert "length 3" in message


def test_capacity_is_read_only():
    tree = CircularSegmentTree(3, concat, "")
    with pytest.raises(AttributeError):
        tree.capacity = 4


def test_items_and_total_pushed():
    tree = CircularSegmentTree(3, concat, "")
    assert tree.items() == []
    assert tree.total_pushed == 0

    for item in "abcdefg":
        tree.push(item)
    assert tree.items() == ["e", "f", "g"]
    assert tree.total_pushed == 7
    assert len(tree) == 3


def test_clear_resets_tree():
    tree = CircularSegmentTree(3, concat, "")
    for item in "abcde":
        tree.push(item)
    tree.clear()

    assert len(tree) == 0
    assert tree.total_pushed == 0
    assert tree.items() == []
    assert tree.query(0, 0) == ""

    for item in "xy":
        tree.push(item)
    assert tree.query(0, 2) == "xy"


@FAST
@given(setup=capacity_and_push_count())
def test_state_dict_round_trip(setup):
    capacity, push_count = setup
    tree = CircularSegmentTree(capacity, concat, "")
    for k in range(push_count):
        tree.push(f"<{k}>")

    state = tree.state_dict()
    assert type(state) is dict
    assert state["capacity"] == capacity
    assert state["total_pushed"] == push_count
    assert state["items"] == tree.items()

    restored = CircularSegmentTree.from_state_dict(state, concat, "")
    assert restored.capacity == tree.capacity
    assert restored.total_pushed == tree.total_pushed
    assert restored.items() == tree.items()
    for start in range(len(tree) + 1):
        for stop in range(start, len(tree) + 1):
            assert restored.query(start, stop) == tree.query(start, stop)


def test_restored_tree_keeps_evicting():
    tree = CircularSegmentTree(3, concat, "")
    for item in "abcd":
        tree.push(item)
    restored = CircularSegmentTree.from_state_dict(tree.state_dict(), concat, "")

    tree.push("e")
    restored.push("e")
    assert restored.items() == tree.items() == ["c", "d", "e"]
    assert restored.query(0, 3) == "cde"
    assert restored.total_pushed == 5


@pytest.mark.parametrize(
    "state",
    [
        {"capacity": 2, "total_pushed": 3, "items": ["a", "b", "c"]},
        {"capacity": 3, "total_pushed": 1, "items": ["a", "b"]},
        {"capacity": 0, "total_pushed": 0, "items": []},
    ],
)
def test_from_state_dict_invalid_raises(state):
    with pytest.raises(ValueError):
        CircularSegmentTree.from_state_dict(state, concat, "")


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8, 100, 1000, 1024])
def test_combine_count_logarithmic(capacity):
    counter = CountingConcat()
    tree = CircularSegmentTree(capacity, counter, "")
    depth = math.ceil(math.log2(capacity))
    max_push_calls = 0
    max_query_calls = 0

    for k in range(capacity + capacity // 2 + 1):
        counter.calls = 0
        tree.push(f"{k % 10}")
        max_push_calls = max(max_push_calls, counter.calls)

    # A sample of ranges that includes wrapped, full and single-item ones.
    size = len(tree)
    starts = sorted({0, 1, size // 3, size // 2, size - 1})
    stops = sorted({1, size // 2 + 1, size - 1, size})
    for start in starts:
        for stop in stops:
            if start <= stop:
                counter.calls = 0
                tree.query(start, stop)
                max_query_calls = max(max_query_calls, counter.calls)

    assert max_push_calls <= depth
    assert max_query_calls <= 2 * depth + 1


def test_combine_count_exhaustive_small():
    for capacity in range(1, 34):
        counter = CountingConcat()
        tree = CircularSegmentTree(capacity, counter, "")
        depth = math.ceil(math.log2(capacity))
        for k in range(capacity + capacity // 2 + 1):
            counter.calls = 0
            tree.push(f"{k % 10}")
            assert counter.calls <= depth, f"capacity={capacity} push {k}"

        for start in range(capacity + 1):
            for stop in range(start, capacity + 1):
                counter.calls = 0
                tree.query(start, stop)
                assert counter.calls <= 2 * depth + 1, (
                    f"capacity={capacity} range=({start}, {stop})"
                )
