"""Sliding-window range folds over the most recent items of a stream."""

from __future__ import annotations

import numbers
import operator
from typing import Any, Callable, Generic, TypeVar

__all__ = ["CircularSegmentTree"]

T = TypeVar("T")

# Marks an accumulator that has not received an item yet, so that folds do
# not spend combines on the identity. Items themselves may be any value.
_EMPTY: Any = object()


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class CircularSegmentTree(Generic[T]):
    """Ordered range folds over the last ``capacity`` pushed items.

    The kept items live in a ring buffer of ``capacity`` leaves, and an
    iterative (bottom-up) segment tree sits on top of it in a flat list of
    ``2 * capacity`` nodes. Physical leaf ``i`` is node ``capacity + i``,
    node ``k`` stores ``combine(node[2k], node[2k + 1])``, and unset nodes
    contain ``identity``. The leaf count is not padded to a power of two.
    When it is not one, a few upper nodes fold leaves out of order, but a
    query never reads them. Its separate left and right accumulators keep
    the order for any capacity, which the tests check exhaustively for
    capacities 1 to 40. Logical position ``i`` (0 is the oldest kept
    item) is physical leaf ``(head + i) % capacity``. A logical range that
    wraps past the last leaf is computed as two physical ranges, the tail
    ``[p, capacity)`` and the head ``[0, q)``, joined as
    ``combine(tail_fold, head_fold)``.

    Parameters
    ----------
    capacity : int
        Maximum number of kept items, at least 1. Pushing into a full tree
        evicts the oldest item.
    combine : callable
        ``combine(earlier, later)`` returns the aggregate of ``earlier``
        followed by ``later``. It must be associative but need not be
        commutative; for Jacobian matrices it is ``later @ earlier``.
    identity
        Neutral item of ``combine``, returned for empty ranges.

    Notes
    -----
    ``push`` costs at most ``ceil(log2(capacity))`` combines and ``query``
    at most ``2 * ceil(log2(capacity)) + 1``. Items are treated as immutable
    values: the tree stores the objects it is given and never modifies them,
    so callers must not modify them either.
    """

    def __init__(
        self, capacity: int, combine: Callable[[T, T], T], identity: T
    ) -> None:
        if not _is_integer(capacity) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")

        self._capacity = int(capacity)
        self._combine = combine
        self._identity = identity
        self._nodes: list[T] = [identity] * (2 * self._capacity)
        self._head = 0
        self._size = 0
        self._total_pushed = 0

    @property
    def capacity(self) -> int:
        """Maximum number of kept items."""
        return self._capacity

    @property
    def total_pushed(self) -> int:
        """Number of items pushed since construction or the last ``clear``."""
        return self._total_pushed

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self._capacity}, "
            f"len={self._size}, total_pushed={self._total_pushed})"
        )

    def nodes(self) -> tuple[T, ...]:
        """Return a copy of the node array: node 1 is the root, leaf i is node ``capacity + i``."""
        return tuple(self._nodes)

    def __getitem__(self, index: int) -> T:
        """Return the kept item at a logical index (negative counts from newest)."""
        position = operator.index(index)
        if position < 0:
            position += self._size
        if not 0 <= position < self._size:
            raise IndexError(
                f"index {index} is out of range for a tree of length {self._size}"
            )
        return self._nodes[self._capacity + self._physical(position)]

    def push(self, item: T) -> None:
        """Append ``item`` as the newest item, evicting the oldest when full."""
        if self._size < self._capacity:
            leaf = self._physical(self._size)
            self._size += 1
        else:
            leaf = self._head
            self._head = (self._head + 1) % self._capacity
        self._total_pushed += 1
        self._set_leaf(leaf, item)

    def query(self, start: int, stop: int) -> T:
        """Fold the items at logical positions ``start .. stop - 1`` in order.

        Returns ``identity`` when ``start == stop``.

        Raises
        ------
        ValueError
            If the range is not ``0 <= start <= stop <= len(self)``.
        """
        start = operator.index(start)
        stop = operator.index(stop)
        if not 0 <= start <= stop <= self._size:
            raise ValueError(
                f"invalid range start={start}, stop={stop} for a tree of "
                f"length {self._size}; expected 0 <= start <= stop <= {self._size}"
            )
        if start == stop:
            return self._identity

        first = self._physical(start)
        end = first + (stop - start)
        if end <= self._capacity:
            return self._fold_leaves(first, end)

        tail = self._fold_leaves(first, self._capacity)
        head = self._fold_leaves(0, end - self._capacity)
        return self._combine(tail, head)

    def items(self) -> list[T]:
        """Return the kept items, oldest first."""
        return [self[position] for position in range(self._size)]

    def clear(self) -> None:
        """Remove all items and reset ``total_pushed`` to zero."""
        self._nodes = [self._identity] * (2 * self._capacity)
        self._head = 0
        self._size = 0
        self._total_pushed = 0

    def state_dict(self) -> dict[str, Any]:
        """Return the capacity, push count and kept items (oldest first) as a dict."""
        return {
            "capacity": self._capacity,
            "total_pushed": self._total_pushed,
            "items": self.items(),
        }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        combine: Callable[[T, T], T],
        identity: T,
    ) -> CircularSegmentTree[T]:
        """Rebuild a tree from ``state_dict`` output by pushing its items.

        A full tree is rebuilt with its ring buffer rotated as before (head at
        ``total_pushed % capacity``), so every query folds the same nodes in
        the same grouping. Floating point folds then give bitwise equal results.

        Raises
        ------
        ValueError
            If the state has more items than its capacity, or a
            ``total_pushed`` smaller than its number of items.
        """
        items = list(state["items"])
        total_pushed = state["total_pushed"]
        tree = cls(state["capacity"], combine, identity)
        if len(items) > tree.capacity:
            raise ValueError(
                f"invalid state: {len(items)} items exceed capacity {tree.capacity}"
            )
        if not _is_integer(total_pushed) or total_pushed < len(items):
            raise ValueError(
                f"invalid state: total_pushed={total_pushed!r} must be an "
                f"integer >= the number of items ({len(items)})"
            )

        # Placeholders fill the leaves before the head and are evicted by the last pushes.
        if len(items) == tree.capacity:
            for _ in range(int(total_pushed) % tree.capacity):
                tree.push(identity)
        for item in items:
            tree.push(item)
        tree._total_pushed = int(total_pushed)
        return tree

    def _physical(self, position: int) -> int:
        return (self._head + position) % self._capacity

    def _set_leaf(self, leaf: int, item: T) -> None:
        nodes = self._nodes
        node = self._capacity + leaf
        nodes[node] = item
        node //= 2
        while node >= 1:
            nodes[node] = self._combine(nodes[2 * node], nodes[2 * node + 1])
            node //= 2

    def _fold_leaves(self, first: int, end: int) -> T:
        """Fold physical leaves ``first .. end - 1`` in order; requires first < end.

        Walking up from both ends, a left boundary at a right child (odd
        node) and a right boundary after a left child are taken whole and
        the boundaries move to the parents. The left accumulator grows on
        its right and the right accumulator on its left, so the order is
        preserved even where the tree is not perfect.
        """
        nodes = self._nodes
        left = _EMPTY
        right = _EMPTY
        low = first + self._capacity
        high = end + self._capacity
        while low < high:
            if low & 1:
                if left is _EMPTY:
                    left = nodes[low]
                else:
                    left = self._combine(left, nodes[low])
                low += 1
            if high & 1:
                high -= 1
                if right is _EMPTY:
                    right = nodes[high]
                else:
                    right = self._combine(nodes[high], right)
            low //= 2
            high //= 2

        if left is _EMPTY:
            return right
        if right is _EMPTY:
            return left
        return self._combine(left, right)
