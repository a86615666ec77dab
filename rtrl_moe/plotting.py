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
    from tqdm.auto import tqdm

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
