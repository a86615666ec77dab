"""Plotting and saving helpers used by the notebooks.

Figures are written as PNG and SVG and tables as CSV and Markdown under fixed
names, with the volatile metadata (dates, random SVG ids) removed so that a
diff of ``figures/`` shows only real changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

matplotlib.rcParams["svg.hashsalt"] = "rtrl_moe"


def quiet() -> bool:
    """Return True when progress bars should be hidden (``CI`` or ``RTRL_MOE_QUIET`` set)."""
    return bool(os.environ.get("CI") or os.environ.get("RTRL_MOE_QUIET"))


def progress(iterable: Iterable, **kwargs):
    """Wrap ``iterable`` in a notebook-friendly tqdm bar, hidden under CI."""
    from tqdm.std import tqdm

    return tqdm(iterable, disable=quiet(), **kwargs)


def save_figure(fig: Figure, name: str, figures_dir: str | Path) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.svg``; return the paths."""
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    fig.savefig(png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return [png, svg]


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """Format ``frame`` as a GitHub Markdown table with numbers rounded to ``digits``."""
    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            if math.isnan(value):
                return "n/a"
            return f"{value:.{digits}g}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def save_table(frame: pd.DataFrame, name: str, figures_dir: str | Path,
               digits: int = 4) -> list[Path]:
    """Save ``frame`` as ``<name>.csv`` and ``<name>.md``; return the paths."""
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    frame.to_csv(csv, index=False, float_format=f"%.{digits + 2}g")
    md.write_text(markdown_table(frame, digits))
    return [csv, md]


def routing_heatmaps(read: np.ndarray, write: np.ndarray, experts: np.ndarray,
                     n_slots: int, n_experts: int, tokens: Sequence[str] | None = None) -> Figure:
    """Plot which slots are read and written and which experts run at each step.

    ``read``, ``write`` and ``experts`` hold the selected indices per step (``T, k``).
    """
    steps = read.shape[0]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * steps), 6.5), sharex=True)
    for ax, chosen, size, title in [(axes[0], read, n_slots, "read set R_t"),
                                    (axes[1], write, n_slots, "write set W_t"),
                                    (axes[2], experts, n_experts, "selected experts")]:
        grid = np.zeros((size, steps))
        for t in range(steps):
            grid[chosen[t], t] = 1
        ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel("expert" if size == n_experts and chosen is experts else "slot")
        ax.set_title(title, fontsize=10)
    axes[-1].set_xlabel("step")
    if tokens is not None:
        axes[-1].set_xticks(range(steps), tokens, fontsize=7)
    fig.tight_layout()
    return fig


def spy_jacobian(jacobian: np.ndarray, d_model: int, read: Sequence[int],
                 write: Sequence[int]) -> Figure:
    """Spy plot of one state Jacobian with the slot blocks and the read/write sets marked."""
    size = jacobian.shape[0]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.spy(np.abs(jacobian) > 0, markersize=0.6, color="black")
    for edge in range(0, size + 1, d_model):
        ax.axhline(edge - 0.5, color="0.85", lw=0.5)
        ax.axvline(edge - 0.5, color="0.85", lw=0.5)
    for slot in write:
        ax.axhspan(slot * d_model - 0.5, (slot + 1) * d_model - 0.5, color="tab:red", alpha=0.12)
    for slot in read:
        ax.axvspan(slot * d_model - 0.5, (slot + 1) * d_model - 0.5, color="tab:blue", alpha=0.12)
    ax.set_title("nonzeros of dh_{t+1}/dh_t (red rows: W_t, blue columns: R_t)", fontsize=9)
    ax.set_xlabel("input state index")
    ax.set_ylabel("output state index")
    return fig


def band_plot(ax, x: np.ndarray, curves: np.ndarray, label: str, color: str | None = None) -> None:
    """Plot the mean of ``curves`` (``runs, points``) with a min-max band."""
    mean = curves.mean(axis=0)
    line, = ax.plot(x, mean, label=label, color=color)
    ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average with a window that grows from 1 at the start."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(values)
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    shifted = np.concatenate([np.zeros(window), sums])[: len(values)]
    return (sums - shifted) / counts


def _node_label(value) -> str:
    """Return the text shown for a tree node, with a dash for the empty string."""
    text = str(value)
    return text if text else "–"


def circular_tree_figure(tree, label=_node_label) -> Figure:
    """Draw a ``CircularSegmentTree``: the ring of leaves, the node array and the heap tree.

    Left: the ``capacity`` leaves as a ring buffer, with the head (the oldest
    kept item) and the logical position of every kept item. Middle: the flat
    array of ``2 * capacity`` nodes, leaves shaded. Right: the same array as a
    binary tree, node ``k`` above nodes ``2k`` and ``2k + 1``. ``label`` turns a
    node value into text.
    """
    capacity, size = tree.capacity, len(tree)
    head = (tree.total_pushed - size) % capacity
    nodes = list(tree.nodes())

    fig = plt.figure(figsize=(13, 4.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 2.2], height_ratios=[1, 2.2])
    ring_ax = fig.add_subplot(grid[:, 0])
    array_ax = fig.add_subplot(grid[0, 1])
    tree_ax = fig.add_subplot(grid[1, 1])
    leaf_color, inner_color = "#cfe3f5", "#f2f2f2"

    # Ring buffer: physical leaf i sits at angle 90 - 360 i / capacity degrees.
    angles = np.pi / 2 - 2 * np.pi * np.arange(capacity) / capacity
    for leaf, angle in enumerate(angles):
        x, y = np.cos(angle), np.sin(angle)
        ring_ax.add_patch(plt.Circle((x, y), 0.3, facecolor=leaf_color, edgecolor="black"))
        ring_ax.text(x, y, label(nodes[capacity + leaf]), ha="center", va="center", fontsize=11)
        ring_ax.text(1.72 * x, 1.72 * y + 0.1, f"leaf {leaf}\n(node {capacity + leaf})",
                     ha="center", va="center", fontsize=7, color="0.35")
        logical = (leaf - head) % capacity
        if logical < size:
            ring_ax.text(1.72 * x, 1.72 * y - 0.22, f"logical {logical}", ha="center",
                         va="center", fontsize=7, color="tab:blue")
    head_x, head_y = np.cos(angles[head]), np.sin(angles[head])
    ring_ax.annotate("", xy=(0.62 * head_x, 0.62 * head_y), xytext=(0, 0),
                     arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ring_ax.text(0, 0, "head", ha="center", va="center", fontsize=9, color="tab:red",
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ring_ax.set_xlim(-2.3, 2.3)
    ring_ax.set_ylim(-2.3, 2.3)
    ring_ax.set_aspect("equal")
    ring_ax.axis("off")
    ring_ax.set_title(f"ring buffer of {capacity} leaves\n(logical 0 is the oldest kept item)",
                      fontsize=9)

    # Flat node array.
    for index, value in enumerate(nodes):
        color = leaf_color if index >= capacity else inner_color
        unused = index == 0
        array_ax.add_patch(plt.Rectangle((index, 0), 1, 1, facecolor="white" if unused else color,
                                         edgecolor="black", hatch="//" if unused else None))
        if not unused:
            array_ax.text(index + 0.5, 0.5, label(value), ha="center", va="center", fontsize=8)
        array_ax.text(index + 0.5, -0.3, str(index), ha="center", va="center", fontsize=7,
                      color="0.35")
    array_ax.annotate("head", xy=(capacity + head + 0.5, 1.0), xytext=(capacity + head + 0.5, 1.7),
                      ha="center", fontsize=8, color="tab:red",
                      arrowprops={"arrowstyle": "->", "color": "tab:red"})
    array_ax.set_xlim(-0.2, 2 * capacity + 0.2)
    array_ax.set_ylim(-0.7, 2.0)
    array_ax.axis("off")
    array_ax.set_title(f"node array (2 x {capacity}; node 0 unused, leaves shaded)", fontsize=9)

    # Heap view: node k at depth floor(log2 k), spread evenly within its depth.
    def position(node: int) -> tuple[float, float]:
        depth = node.bit_length() - 1
        return (node - 2 ** depth + 0.5) / 2 ** depth, -depth

    for node in range(1, capacity):
        for child in (2 * node, 2 * node + 1):
            (x0, y0), (x1, y1) = position(node), position(child)
            tree_ax.plot([x0, x1], [y0, y1], color="0.6", lw=0.8, zorder=1)
    for node in range(1, 2 * capacity):
        x, y = position(node)
        color = leaf_color if node >= capacity else inner_color
        tree_ax.text(x, y, f"{node}: {label(nodes[node])}", ha="center", va="center", fontsize=8,
                     zorder=2, bbox={"boxstyle": "round", "facecolor": color, "edgecolor": "black"})
    depth = (2 * capacity - 1).bit_length() - 1
    tree_ax.set_xlim(-0.02, 1.02)
    tree_ax.set_ylim(-depth - 0.5, 0.5)
    tree_ax.axis("off")
    tree_ax.set_title("the same nodes as a binary tree: node k = combine(node 2k, node 2k+1)",
                      fontsize=9)
    return fig


def dormant_spans(selected: np.ndarray, sequence_starts: Sequence[int]) -> pd.DataFrame:
    """List every maximal run of steps in which an expert was not selected.

    ``selected`` is a boolean ``(n_experts, steps)`` array over the steps of
    several sequences laid end to end, and ``sequence_starts`` the first step of
    each sequence. Runs stop at sequence boundaries. Returns one row per run:
    ``expert``, ``start``, ``length`` and ``reselected`` (True when the expert is
    selected again in the same sequence, False when the run reaches the end).
    """
    n_experts, steps = selected.shape
    bounds = list(sequence_starts) + [steps]
    rows = []
    for expert in range(n_experts):
        for first, end in zip(bounds[:-1], bounds[1:]):
            run_start = None
            for step in range(first, end):
                if not selected[expert, step] and run_start is None:
                    run_start = step
                elif selected[expert, step] and run_start is not None:
                    rows.append((expert, run_start, step - run_start, True))
                    run_start = None
            if run_start is not None:
                rows.append((expert, run_start, end - run_start, False))
    return pd.DataFrame(rows, columns=["expert", "start", "length", "reselected"])


def dormancy_figure(selected: np.ndarray, sequence_starts: Sequence[int],
                    spans: pd.DataFrame) -> Figure:
    """Plot an expert x step raster of selections and a histogram of dormant-run lengths.

    ``selected`` and ``sequence_starts`` are as in :func:`dormant_spans` and
    ``spans`` is its result.
    """
    n_experts, steps = selected.shape
    fig, (raster_ax, hist_ax) = plt.subplots(
        1, 2, figsize=(13, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    raster_ax.imshow(selected, aspect="auto", cmap="Greys", vmin=0, vmax=1,
                     interpolation="nearest")
    for start in sequence_starts[1:]:
        raster_ax.axvline(start - 0.5, color="tab:red", lw=0.6)
    raster_ax.set_xlabel("step (red lines: sequence boundaries)")
    raster_ax.set_ylabel("expert")
    raster_ax.set_yticks(range(n_experts))
    raster_ax.set_title("selected experts (black) and dormant experts (white)", fontsize=10)

    longest = int(spans["length"].max()) if len(spans) else 1
    edges = np.arange(1, longest + 2) - 0.5
    groups = [spans.loc[spans["reselected"], "length"], spans.loc[~spans["reselected"], "length"]]
    hist_ax.hist(groups, bins=edges, stacked=True, color=["tab:blue", "0.7"],
                 label=["selected again (caught up)", "until sequence end (never caught up)"])
    hist_ax.set_xlabel("dormant run length (steps)")
    hist_ax.set_ylabel("runs")
    hist_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
