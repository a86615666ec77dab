"""PNG and SVG plots of the suite results.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg
(PNG) and SVG canvases, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

METHOD_STYLES = {"rtrl-dense": ("tab:red", "s"), "rtrl-sparse": ("tab:blue", "o"),
                 "rtrl-lazy": ("tab:green", "^"), "bptt": ("tab:gray", "D"),
                 "FLOPs dense/sparse": ("tab:blue", "o"), "FLOPs dense/lazy": ("tab:green", "^")}
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def _log_axes(axes, xs: list[float]) -> None:
    """Use log scales with the x ticks at the measured values and plain numbers on y."""
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    if xs:
        axes.set_xticks(sorted(set(xs)), labels=[f"{x:g}" for x in sorted(set(xs))])
        axes.xaxis.set_minor_formatter(NullFormatter())
    _plain_log_y(axes)


def _plain_log_y(axes) -> None:
    """Put log-scale y ticks at 1, 2 and 5 times powers of ten, written as plain numbers."""
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(PLAIN)
    axes.yaxis.set_minor_formatter(NullFormatter())


def _save(figure: Figure, out_dir: Path, stem: str) -> list[str]:
    names = []
    for suffix in ("png", "svg"):
        name = f"{stem}.{suffix}"
        figure.savefig(out_dir / name, dpi=150)
        names.append(name)
    return names


def _plot_methods(axes, series: dict[str, list[tuple[float, float]]]) -> None:
    """Draw one line per method from (x, y) pairs; methods without points are left out."""
    for method, points in series.items():
        if not points:
            continue
        color, marker = METHOD_STYLES.get(method, ("black", "x"))
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker=marker, color=color, label=method)
    if axes.lines:
        axes.legend(fontsize="small")


def plot_speed(block: dict, out_dir: Path) -> list[str]:
    """Bar chart of the median step time of each measured method (log scale)."""
    measured = {m: r["step_ms"] for m, r in block["methods"].items() if r.get("status") == "ok"}
    if not measured:
        return []
    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.add_subplot()
    colors = [METHOD_STYLES.get(m, ("black", ""))[0] for m in measured]
    axes.bar(list(measured), list(measured.values()), color=colors)
    axes.set_yscale("log")
    _plain_log_y(axes)
    axes.set_ylabel("median time per step (ms)")
    axes.set_title(f"per-step time, batch size {block['batch_size']}")
    return _save(figure, out_dir, "speed")


def plot_scaling(block: dict, out_dir: Path) -> list[str]:
    """Step time (top) and FLOP ratios (bottom) against n_slots and n_experts."""
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    grid = figure.subplots(2, 2, squeeze=False)
    for column, field in enumerate(("n_slots", "n_experts")):
        points = [p for p in block["points"] if p["parameter"] == field]
        methods = sorted({m for p in points for m in p["methods"]})
        times = {m: [(p["value"], p["methods"][m]["step_ms"]) for p in points
                     if p["methods"].get(m, {}).get("status") == "ok"] for m in methods}
        _plot_methods(grid[0][column], times)
        grid[0][column].set_ylabel("median time per step (ms)")

        ratios = {"FLOPs dense/sparse": [(p["value"], p["flop_ratio_dense_sparse"])
                                         for p in points if p["flop_ratio_dense_sparse"]],
                  "FLOPs dense/lazy": [(p["value"], p["flop_ratio_dense_lazy"])
                                       for p in points if p["flop_ratio_dense_lazy"]]}
        _plot_methods(grid[1][column], ratios)
        grid[1][column].set_ylabel("FLOP ratio")
        grid[1][column].set_xlabel(field)
        for axes in (grid[0][column], grid[1][column]):
            _log_axes(axes, [p["value"] for p in points])
    figure.suptitle("scaling at batch size 1 (skipped points are left out)")
    return _save(figure, out_dir, "scaling")


def plot_batch(block: dict, out_dir: Path) -> list[str]:
    """Time per sample against the batch size, one line per method."""
    methods = sorted({m for p in block["points"] for m in p["methods"]})
    series = {m: [(p["batch_size"], p["methods"][m]["per_sample_ms"]) for p in block["points"]
                  if p["methods"].get(m, {}).get("status") == "ok"] for m in methods}
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    _plot_methods(axes, series)
    _log_axes(axes, [p["batch_size"] for p in block["points"]])
    axes.set_xlabel("batch size")
    axes.set_ylabel("median time per step / batch size (ms)")
    axes.set_title("per-sample cost (skipped points are left out)")
    return _save(figure, out_dir, "batch")


def plot_memory(block: dict, out_dir: Path) -> list[str]:
    """Peak memory above the baseline against the sequence length, with the sensitivity size."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in block["comparison"]:
        for method, key in (("bptt", "bptt_peak_bytes"), ("rtrl-lazy", "lazy_peak_bytes")):
            if row[key] is not None:
                series.setdefault(method, []).append((row["length"], row[key] / 2**20))
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    _plot_methods(axes, series)
    axes.axhline(block["sensitivity_bytes"] / 2**20, color="black", linestyle=":",
                 label="sensitivity matrix")
    axes.legend(fontsize="small")
    _log_axes(axes, [row["length"] for row in block["comparison"]])
    axes.set_xlabel("sequence length T")
    axes.set_ylabel(f"peak above baseline (MiB, {block['memory_kind']})")
    axes.set_title("memory against sequence length")
    return _save(figure, out_dir, "memory")


PLOTS = {"speed": plot_speed, "scaling": plot_scaling, "batch": plot_batch,
         "memory": plot_memory}


def write_plots(results: dict, out_dir: Path) -> dict[str, list[str]]:
    """Write the plot of every suite in ``results``; return the file names by suite."""
    return {suite: plot(results[suite], out_dir)
            for suite, plot in PLOTS.items() if suite in results}
