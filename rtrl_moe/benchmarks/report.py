"""Tables of the suite results: CSV rows, a plain-text summary and ``summary.md``."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from rtrl_moe.benchmarks.config import SUITES

Column = tuple[str, str, Callable[[object], str]]


def format_number(value: object) -> str:
    """Format a measured value with about four significant digits; "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_gflop(value: object) -> str:
    """Format a FLOP count in GFLOP."""
    return "-" if value is None else format_number(value / 1e9)


def format_mib(value: object) -> str:
    """Format a byte count in MiB."""
    return "-" if value is None else format_number(value / 2**20)


def _status(record: dict) -> str:
    if record.get("status") == "ok":
        return "ok"
    return f"{record.get('status', 'missing')}: {record.get('reason', '')}".rstrip(": ")


# --- CSV rows, one list per suite ---------------------------------------------------------

def speed_rows(block: dict) -> list[dict]:
    """Return one row per method: step times, FLOPs and the ratios of the same run."""
    records = block["methods"]
    dense_ms = records.get("rtrl-dense", {}).get("step_ms")
    bptt_ms = records.get("bptt", {}).get("step_ms")
    rows = []
    for method, record in records.items():
        step_ms = record.get("step_ms")
        rows.append({
            "method": method, "status": _status(record), "step_ms": step_ms,
            "step_ms_min": record.get("step_ms_min"), "step_ms_max": record.get("step_ms_max"),
            "timed_steps": record.get("timed_steps"),
            "flops_per_step": record.get("flops_per_step"),
            "dense_over_method": dense_ms / step_ms if dense_ms and step_ms else None,
            "method_over_bptt": step_ms / bptt_ms if bptt_ms and step_ms else None,
        })
    return rows


def floor_rows(block: dict) -> list[dict]:
    """Return one row per RTRL method: FLOPs, floor time, step time and efficiency."""
    keys = ("flops_per_step", "floor_ms", "step_ms", "efficiency", "step_gflops_per_s",
            "floor_gflops_per_s")
    return [{"method": method, "status": _status(record), **{k: record.get(k) for k in keys}}
            for method, record in block["methods"].items()]


def scaling_rows(block: dict) -> list[dict]:
    """Return one row per swept value and method, with the point's FLOP ratios."""
    rows = []
    for point in block["points"]:
        for method, record in point["methods"].items():
            rows.append({
                "parameter": point["parameter"], "value": point["value"],
                "n_params": point["n_params"], "state_size": point["state_size"],
                "method": method, "status": _status(record), "step_ms": record.get("step_ms"),
                "flops_per_step": record.get("flops_per_step"),
                "flop_ratio_dense_sparse": point["flop_ratio_dense_sparse"],
                "flop_ratio_dense_lazy": point["flop_ratio_dense_lazy"],
            })
    return rows


def batch_rows(block: dict) -> list[dict]:
    """Return one row per batch size and method: step time and time per sample."""
    return [{"batch_size": point["batch_size"], "method": method, "status": _status(record),
             "step_ms": record.get("step_ms"), "per_sample_ms": record.get("per_sample_ms")}
            for point in block["points"] for method, record in point["methods"].items()]


def memory_rows(block: dict) -> list[dict]:
    """Return one row per method and length with the peaks above and with the baseline."""
    keys = ("baseline_rss_kib", "peak_rss_kib", "peak_rss_above_baseline_kib",
            "cuda_baseline_bytes", "cuda_peak_bytes", "cuda_peak_above_baseline_bytes",
            "ms_per_step", "seconds")
    return [{"method": record["method"], "length": record["length"], "status": _status(record),
             **{k: record.get(k) for k in keys}} for record in block["points"]]


ROWS = {"speed": speed_rows, "floor": floor_rows, "scaling": scaling_rows,
        "batch": batch_rows, "memory": memory_rows}


def write_csv(rows: list[dict], path: Path) -> None:
    """Write ``rows`` (dicts with equal keys) as a CSV file with a header line."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["status"])
        writer.writeheader()
        writer.writerows(rows)


# --- display tables -------------------------------------------------------------------------

def _columns(suite: str) -> list[Column]:
    text, number = str, format_number
    return {
        "speed": [("method", "method", text), ("step_ms", "ms/step", number),
                  ("flops_per_step", "GFLOP/step", format_gflop),
                  ("dense_over_method", "dense/this", number),
                  ("method_over_bptt", "this/bptt", number), ("status", "status", text)],
        "floor": [("method", "method", text), ("flops_per_step", "GFLOP/step", format_gflop),
                  ("floor_ms", "floor ms", number), ("step_ms", "step ms", number),
                  ("efficiency", "efficiency", number), ("status", "status", text)],
        "scaling": [("parameter", "swept", text), ("value", "value", text),
                    ("n_params", "params", text), ("method", "method", text),
                    ("step_ms", "ms/step", number), ("flops_per_step", "GFLOP/step", format_gflop),
                    ("flop_ratio_dense_sparse", "FLOPs dense/sparse", number),
                    ("flop_ratio_dense_lazy", "FLOPs dense/lazy", number),
                    ("status", "status", text)],
        "batch": [("batch_size", "B", text), ("method", "method", text),
                  ("step_ms", "ms/step", number), ("per_sample_ms", "ms/sample", number),
                  ("status", "status", text)],
        "memory": [("method", "method", text), ("length", "T", text),
                   ("peak_mib", "peak MiB", number), ("baseline_mib", "baseline MiB", number),
                   ("above_mib", "above baseline MiB", number),
                   ("ms_per_step", "ms/step", number), ("status", "status", text)],
    }[suite]


def _display_rows(suite: str, block: dict) -> list[dict]:
    rows = ROWS[suite](block)
    if suite != "memory":
        return rows
    for row in rows:
        if row.get("cuda_peak_bytes") is not None:
            row["peak_mib"] = row["cuda_peak_bytes"] / 2**20
            row["baseline_mib"] = row["cuda_baseline_bytes"] / 2**20
            row["above_mib"] = row["cuda_peak_above_baseline_bytes"] / 2**20
        elif row.get("peak_rss_kib") is not None:
            row["peak_mib"] = row["peak_rss_kib"] / 1024
            row["baseline_mib"] = row["baseline_rss_kib"] / 1024
            row["above_mib"] = row["peak_rss_above_baseline_kib"] / 1024
    return rows


def _cells(suite: str, block: dict) -> tuple[list[str], list[list[str]]]:
    columns = _columns(suite)
    headers = [header for _, header, _ in columns]
    body = [[formatter(row.get(key)) for key, _, formatter in columns]
            for row in _display_rows(suite, block)]
    return headers, body


def text_table(headers: list[str], body: list[list[str]]) -> str:
    """Return a plain-text table with left-aligned, space-padded columns."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [headers, ["-" * w for w in widths], *body]]
    return "\n".join(lines)


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    """Return a GitHub-flavoured Markdown table."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, body)])


def targets_of(results: dict) -> list[dict]:
    """Return the target records of every suite in ``results``."""
    return [target for suite in SUITES if suite in results
            for target in results[suite].get("targets", [])]


def _target_cells(results: dict) -> tuple[list[str], list[list[str]]]:
    body = [[t["target"], t["required"], format_number(t["measured"]), t["status"]]
            for t in targets_of(results)]
    return ["target", "required", "measured", "result"], body


def _extra_lines(suite: str, block: dict) -> list[str]:
    if suite == "speed":
        ratios = ", ".join(f"{name} = {format_number(value)}"
                           for name, value in block["ratios"].items())
        return [f"Ratios of median step times: {ratios}."]
    if suite == "memory":
        crossover = block["crossover_length"]
        return [f"Crossover length (first T where bptt peak > rtrl-lazy peak, above baseline): "
                f"{crossover if crossover is not None else 'none in range'}.",
                f"Sensitivity matrix (B x H x n_params x dtype size): "
                f"{format_mib(block['sensitivity_bytes'])} MiB; BPTT stores "
                + ", ".join(f"{format_mib(row['bptt_peak_bytes'])} MiB at T={row['length']}"
                            for row in block["comparison"]) + " above its baseline."]
    return []


def render_text(results: dict) -> str:
    """Return the plain-text summary printed at the end of a run."""
    meta = results["meta"]
    parts = [f"{meta['date']}  {meta['processor']}  device={meta['device']}  "
             f"threads={meta['threads']}  dtype={meta['dtype']}  torch {meta['torch_version']}"]
    for suite in SUITES:
        if suite in results:
            parts.append(f"\n[{suite}]")
            parts.append(text_table(*_cells(suite, results[suite])))
            parts.extend(_extra_lines(suite, results[suite]))
    if targets_of(results):
        parts.append("\n[targets]")
        parts.append(text_table(*_target_cells(results)))
    return "\n".join(parts)


def render_markdown(results: dict, plots: dict[str, list[str]]) -> str:
    """Return ``summary.md``: environment, one table per suite, targets and plots."""
    meta = results["meta"]
    lines = ["# Benchmark results", "",
             "Generated by `python -m rtrl_moe.benchmarks`; see docs/benchmarks.md for how to "
             "read each number.", ""]
    environment = [[key, str(meta.get(key))] for key in
                   ("date", "command", "device", "processor", "cpu_count", "load_average_1min",
                    "threads", "dtype", "torch_version", "python_version", "git_commit")]
    lines += [markdown_table(["field", "value"], environment), ""]
    if targets_of(results):
        lines += ["## Targets", "", markdown_table(*_target_cells(results)), ""]
    for suite in SUITES:
        if suite not in results:
            continue
        block = results[suite]
        lines += [f"## {suite}", ""]
        if block.get("meta", {}).get("date") not in (None, meta["date"]):
            lines += [f"From an earlier run: {block['meta']['date']}, "
                      f"`{block['meta']['command']}`.", ""]
        lines += [f"Wall time of the suite: {format_number(block.get('wall_seconds'))} s.", ""]
        lines += [markdown_table(*_cells(suite, block)), ""]
        lines += [line for extra in _extra_lines(suite, block) for line in (extra, "")]
        lines += [f"![{suite}]({name})" for name in plots.get(suite, []) if name.endswith(".png")]
        lines += [""] if plots.get(suite) else []
    return "\n".join(lines).rstrip() + "\n"


def write_json(results: dict, path: Path) -> None:
    """Write ``results`` as one indented JSON document."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, allow_nan=False)
        handle.write("\n")
