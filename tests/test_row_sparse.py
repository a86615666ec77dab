"""RowSparseJacobian operations against their dense counterparts, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtrl_moe import CircularSegmentTree, RowSparseJacobian
from rtrl_moe.jacobians import compose_jacobians

SIZE = 6
BATCH = 3
FAST = settings(max_examples=40, deadline=None)

# Changed rows per sample, for the earlier and the later factor of a product.
ROW_SET_PAIRS = {
    "disjoint": ([[0, 1], [2], [4, 5]], [[3], [0, 4], [1]]),
    "overlapping": ([[0, 1, 2], [1, 3], [5]], [[1, 2], [3], [5, 0]]),
    "same": ([[2, 4], [0], [1, 5]], [[2, 4], [0], [1, 5]]),
    "earlier-empty": ([[], [], []], [[1, 2], [3], [0, 5]]),
    "later-empty": ([[1, 2], [3], [0, 5]], [[], [], []]),
    "both-empty": ([[], [], []], [[], [], []]),
    "some-samples-empty": ([[], [2, 3], [0]], [[4], [], [0, 1]]),
    "all-rows": ([list(range(SIZE))] * BATCH, [[0, 3], [5], [1, 2, 4]]),
}


def make_row_sparse(row_sets: list[list[int]], seed: int,
                    padded_width: int | None = None) -> tuple[RowSparseJacobian, torch.Tensor]:
    """Return a row-sparse batch with random changed rows, and its dense matrices built directly.

    Samples with fewer changed rows are padded to a common width with
    unchanged rows whose stored values are the identity rows.
    """
    generator = torch.Generator().manual_seed(seed)
    width = max(len(rows) for rows in row_sets)
    if padded_width is not None:
        width = padded_width
    eye = torch.eye(SIZE, dtype=torch.float64)
    dense = eye.repeat(len(row_sets), 1, 1)
    rows = torch.zeros(len(row_sets), width, dtype=torch.long)
    values = torch.zeros(len(row_sets), width, SIZE, dtype=torch.float64)

    for b, changed in enumerate(row_sets):
        padding = [r for r in range(SIZE) if r not in changed][: width - len(changed)]
        listed = list(changed) + padding
        rows[b] = torch.tensor(listed, dtype=torch.long)
        for i, row in enumerate(listed):
            if row in changed:
                values[b, i] = torch.randn(SIZE, generator=generator, dtype=torch.float64) / SIZE ** 0.5
            else:
                values[b, i] = eye[row]
        dense[b, list(changed)] = values[b, : len(changed)]
    return RowSparseJacobian(rows, values), dense


def assert_valid_rows(jacobian: RowSparseJacobian) -> None:
    for b in range(jacobian.rows.shape[0]):
        listed = jacobian.rows[b].tolist()
        assert len(set(listed)) == len(listed), f"sample {b} lists a row twice: {listed}"


row_sets = st.lists(
    st.lists(st.integers(0, SIZE - 1), unique=True, max_size=SIZE),
    min_size=BATCH, max_size=BATCH,
)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_to_dense_matches_construction(pair):
    for i, row_set in enumerate(pair):
        jacobian, dense = make_row_sparse(row_set, seed=i)

        assert torch.equal(jacobian.to_dense(), dense)


def test_identity_is_dense_identity():
    identity = RowSparseJacobian.identity(BATCH, SIZE, dtype=torch.float64)
    eye = torch.eye(SIZE, dtype=torch.float64).expand(BATCH, -1, -1)

    assert identity.rows.shape == (BATCH, 0)
    assert identity.size == SIZE
    assert torch.equal(identity.to_dense(), eye)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_compose_matches_dense(pair):
    earlier, earlier_dense = make_row_sparse(pair[0], seed=1)
    later, later_dense = make_row_sparse(pair[1], seed=2)

    product = earlier.compose(later)

    assert_valid_rows(product)
    assert torch.allclose(product.to_dense(), later_dense @ earlier_dense, rtol=0, atol=1e-13)
    assert torch.allclose(compose_jacobians(earlier, later).to_dense(),
                          later_dense @ earlier_dense, rtol=0, atol=1e-13)


def test_compose_order_matters():
    earlier, earlier_dense = make_row_sparse(ROW_SET_PAIRS["overlapping"][0], seed=1)
    later, later_dense = make_row_sparse(ROW_SET_PAIRS["overlapping"][1], seed=2)

    product = earlier.compose(later).to_dense()

    assert not torch.allclose(product, earlier_dense @ later_dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_compose_with_identity(pair):
    jacobian, dense = make_row_sparse(pair[0], seed=3)
    identity = RowSparseJacobian.identity(BATCH, SIZE, dtype=torch.float64)

    assert torch.allclose(jacobian.compose(identity).to_dense(), dense, rtol=0, atol=1e-15)
    assert torch.allclose(identity.compose(jacobian).to_dense(), dense, rtol=0, atol=1e-15)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_apply_matches_dense(pair):
    jacobian, dense = make_row_sparse(pair[0], seed=4)
    sensitivity = torch.randn(BATCH, SIZE, 5, dtype=torch.float64)
    expected = dense @ sensitivity
    original = sensitivity.clone()

    jacobian.apply(sensitivity)

    assert torch.allclose(sensitivity, expected, rtol=0, atol=1e-13)
    for b, changed in enumerate(pair[0]):
        unchanged = [r for r in range(SIZE) if r not in changed]
        assert torch.equal(sensitivity[b, unchanged], original[b, unchanged]), f"sample {b}"


def test_apply_writes_column_view():
    jacobian, dense = make_row_sparse(ROW_SET_PAIRS["overlapping"][0], seed=5)
    full = torch.randn(BATCH, SIZE, 9, dtype=torch.float64)
    expected = full.clone()
    expected[:, :, 3:7] = dense @ full[:, :, 3:7]

    jacobian.apply(full[:, :, 3:7])

    assert torch.allclose(full, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_left_apply_matches_dense(pair):
    jacobian, dense = make_row_sparse(pair[0], seed=6)
    vector = torch.randn(BATCH, SIZE, dtype=torch.float64)

    result = jacobian.left_apply(vector)

    expected = (vector.unsqueeze(1) @ dense).squeeze(1)
    assert torch.allclose(result, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("pair", ROW_SET_PAIRS.values(), ids=ROW_SET_PAIRS.keys())
def test_rows_of_matches_dense(pair):
    jacobian, dense = make_row_sparse(pair[0], seed=7)
    query = torch.tensor([[0, 1, 5, 2], [3, 4, 0, 0], [5, 2, 1, 3]])

    result = jacobian.rows_of(query)

    expected = torch.stack([dense[b, query[b]] for b in range(BATCH)])
    assert torch.equal(result, expected)


@pytest.mark.parametrize("extra", [0, 2], ids=["unpadded", "padded"])
def test_padding_rows_change_nothing(extra):
    row_set = ROW_SET_PAIRS["some-samples-empty"][0]
    width = max(len(rows) for rows in row_set) + extra
    jacobian, dense = make_row_sparse(row_set, seed=8, padded_width=width)
    vector = torch.randn(BATCH, SIZE, dtype=torch.float64)

    assert jacobian.rows.shape == (BATCH, width)
    assert torch.equal(jacobian.to_dense(), dense)
    assert torch.allclose(jacobian.left_apply(vector),
                          (vector.unsqueeze(1) @ dense).squeeze(1), rtol=0, atol=1e-13)


@FAST
@given(first=row_sets, second=row_sets, seed=st.integers(0, 2**31 - 1))
def test_random_row_sets_match_dense(first, second, seed):
    earlier, earlier_dense = make_row_sparse(first, seed)
    later, later_dense = make_row_sparse(second, seed + 1)
    generator = torch.Generator().manual_seed(seed)
    sensitivity = torch.randn(BATCH, SIZE, 4, generator=generator, dtype=torch.float64)
    vector = torch.randn(BATCH, SIZE, generator=generator, dtype=torch.float64)
    query = torch.randint(0, SIZE, (BATCH, 3), generator=generator)

    product = earlier.compose(later)
    assert_valid_rows(product)
    assert torch.allclose(product.to_dense(), later_dense @ earlier_dense, rtol=0, atol=1e-13)

    applied = sensitivity.clone()
    earlier.apply(applied)
    assert torch.allclose(applied, earlier_dense @ sensitivity, rtol=0, atol=1e-13)

    left = earlier.left_apply(vector)
    assert torch.allclose(left, (vector.unsqueeze(1) @ earlier_dense).squeeze(1),
                          rtol=0, atol=1e-13)

    rows = earlier.rows_of(query)
    assert torch.equal(rows, torch.stack([earlier_dense[b, query[b]] for b in range(BATCH)]))


def random_items(count: int, seed: int) -> list[tuple[RowSparseJacobian, torch.Tensor]]:
    """Return ``count`` row-sparse batches with per-sample row sets of 0 to 3 rows."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        row_sets = []
        for _ in range(BATCH):
            m = int(torch.randint(0, 4, (1,), generator=generator))
            row_sets.append(torch.randperm(SIZE, generator=generator)[:m].tolist())
        items.append(make_row_sparse(row_sets, seed=seed * 1000 + i))
    return items


def dense_product(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Return ``M_last @ ... @ M_first`` for matrices in push order."""
    product = torch.eye(SIZE, dtype=torch.float64).expand(BATCH, -1, -1)
    for matrix in matrices:
        product = matrix @ product
    return product


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8], ids=lambda c: f"cap{c}")
def test_tree_query_matches_dense_product(capacity):
    identity = RowSparseJacobian.identity(BATCH, SIZE, dtype=torch.float64)
    tree = CircularSegmentTree(capacity, compose_jacobians, identity)
    items = random_items(2 * capacity + 3, seed=capacity)
    pushed: list[torch.Tensor] = []

    for jacobian, dense in items:
        tree.push(jacobian)
        pushed.append(dense)
        window = pushed[-capacity:]
        assert len(tree) == len(window)

        for start in range(len(window) + 1):
            for stop in range(start, len(window) + 1):
                result = tree.query(start, stop).to_dense()
                expected = dense_product(window[start:stop])
                assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12), (
                    f"pushed {len(pushed)}, range [{start}, {stop})")
