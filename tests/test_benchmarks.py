"""Smoke and unit tests of the benchmark package; no test checks a measured time."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtrl_moe.benchmarks import TINY, SUITES, floor_per_step, time_rtrl, time_shapes
from rtrl_moe.benchmarks.cli import parse_args, parse_suites
from rtrl_moe.benchmarks.config import memory_skip_reason
from rtrl_moe.benchmarks.memory import crossover_length
from rtrl_moe.benchmarks.targets import at_least, memory_flatness
from rtrl_moe.benchmarks.timing import sample_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
META_FIELDS = ("device", "processor", "cpu_model", "torch_version", "threads", "dtype", "date",
               "command")
CSV_COLUMNS = {
    "speed": {"method", "status", "step_ms", "flops_per_step"},
    "floor": {"method", "status", "flops_per_step", "floor_ms", "step_ms", "efficiency"},
    "scaling": {"parameter", "value", "method", "step_ms", "flop_ratio_dense_sparse",
                "flop_ratio_dense_lazy"},
    "batch": {"batch_size", "method", "step_ms", "per_sample_ms"},
    "memory": {"method", "length", "status", "baseline_rss_kib", "peak_rss_kib"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Run every suite at the tiny size once and return the process and its output folder."""
    out = tmp_path_factory.mktemp("benchmarks")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "rtrl_moe.benchmarks", "--tiny", "--suite", "all",
               "--threads", "1", "--lengths", "8,16", "--max-batch", "rtrl-dense=1",
               "--out", str(out), "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment,
                               cwd=REPO_ROOT, timeout=300, check=False)
    return completed, out


def test_cli_tiny_exits_zero(tiny_run):
    completed, _ = tiny_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[speed]" in completed.stdout
    assert "[targets]" in completed.stdout


def test_cli_tiny_writes_json(tiny_run):
    completed, out = tiny_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    for field in META_FIELDS:
        assert results["meta"].get(field) is not None, field
    assert results["meta"]["threads"] == 1
    assert results["meta"]["dtype"] == "float32"
    for suite in SUITES:
        assert suite in results, suite
        assert results[suite]["wall_seconds"] >= 0


def test_cli_tiny_speed_block(tiny_run):
    _, out = tiny_run
    speed = json.loads((out / "results.json").read_text())["speed"]

    for method in ("rtrl-dense", "rtrl-sparse", "rtrl-lazy", "bptt"):
        assert speed["methods"][method]["status"] == "ok", method
        assert speed["methods"][method]["step_ms"] > 0, method
    assert speed["methods"]["rtrl-dense"]["flops_per_step"] > \
        speed["methods"]["rtrl-sparse"]["flops_per_step"]
    assert speed["ratios"]["dense/sparse"] > 0
    assert {t["status"] for t in speed["targets"]} <= {"PASS", "FAIL"}


def test_cli_tiny_memory_block(tiny_run):
    _, out = tiny_run
    memory = json.loads((out / "results.json").read_text())["memory"]

    assert [(p["method"], p["length"]) for p in memory["points"]] == \
        [("bptt", 8), ("bptt", 16), ("rtrl-lazy", 8), ("rtrl-lazy", 16)]
    for point in memory["points"]:
        assert point["status"] == "ok", point
        assert point["peak_rss_kib"] >= point["baseline_rss_kib"] > 0
    assert memory["sensitivity_bytes"] == 4 * TINY.state_size * memory["n_params"]


@pytest.mark.parametrize("suite", SUITES)
def test_cli_tiny_csv_parses(tiny_run, suite):
    _, out = tiny_run
    with open(out / f"{suite}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert rows, suite
    assert CSV_COLUMNS[suite] <= set(rows[0]), set(rows[0])


def test_cli_tiny_batch_cap_skips(tiny_run):
    _, out = tiny_run
    with open(out / "batch.csv", newline="") as handle:
        rows = {(row["batch_size"], row["method"]): row for row in csv.DictReader(handle)}

    assert rows[("1", "rtrl-dense")]["status"] == "ok"
    assert rows[("2", "rtrl-dense")]["status"] == \
        "skipped: batch size 2 > --max-batch rtrl-dense=1"
    assert rows[("2", "rtrl-dense")]["step_ms"] == ""
    assert rows[("2", "rtrl-sparse")]["status"] == "ok"
    assert "skipped: batch size 2" in (out / "summary.md").read_text()


def test_cli_tiny_summary_and_plots(tiny_run):
    _, out = tiny_run
    summary = (out / "summary.md").read_text()

    assert "## Targets" in summary
    for suite in SUITES:
        assert f"## {suite}" in summary, suite
    for stem in ("speed", "scaling", "batch", "memory"):
        assert (out / f"{stem}.png").stat().st_size > 0, stem
        assert (out / f"{stem}.svg").stat().st_size > 0, stem


def test_time_shapes_distinct_shapes():
    shapes = [(1, 2, 3, 4), (1, 2, 3, 4), (2, 3, 4, 5)]
    table = time_shapes(shapes, warmup=1, repeats=2)

    assert sorted(table) == [(1, 2, 3, 4), (2, 3, 4, 5)]
    assert all(seconds > 0 for seconds in table.values())


def test_floor_per_step_sums_shapes():
    table = {(1, 2, 3, 4): 0.25, (2, 3, 4, 5): 1.5}
    steps = [[(1, 2, 3, 4), (2, 3, 4, 5)], [(1, 2, 3, 4)], []]

    assert floor_per_step(steps, table) == [1.75, 0.25, 0]


def test_time_shapes_rejects_empty_dimension():
    with pytest.raises(ValueError, match="positive"):
        time_shapes([(1, 0, 3, 4)], warmup=0, repeats=1)


def test_time_guard_skips_slow_point():
    torch.manual_seed(0)
    model = TINY.build(torch.float32, torch.device("cpu"))
    inputs = sample_inputs(TINY, 1, 6, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    timing = time_rtrl(model, "rtrl-sparse", inputs, warmup=1, max_seconds=1e-9)

    assert timing.skipped is not None
    assert "--max-point-seconds" in timing.skipped
    assert timing.summary()["status"] == "skipped"
    assert timing.summary()["flops_per_step"] > 0


def test_time_rtrl_records_shapes():
    torch.manual_seed(0)
    model = TINY.build(torch.float32, torch.device("cpu"))
    inputs = sample_inputs(TINY, 1, 4, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    timing = time_rtrl(model, "rtrl-dense", inputs, warmup=1)

    assert timing.skipped is None
    assert timing.timed_steps == 3
    assert len(timing.matmuls) == 3
    batch, m, k, n = timing.matmuls[0][0]
    assert timing.flops[0] == 2 * batch * m * k * n


def test_memory_check_skips_huge_batch():
    reason = memory_skip_reason("rtrl-dense", TINY, 10**12, 1197, torch.float32,
                                torch.device("cpu"))

    assert reason is not None
    assert "exceeds" in reason
    assert memory_skip_reason("bptt", TINY, 10**12, 1197, torch.float32,
                              torch.device("cpu")) is None


def test_parse_suites_order_and_all():
    assert parse_suites("floor,speed") == ("speed", "floor")
    assert parse_suites("all") == SUITES


@pytest.mark.parametrize("argv, message", [
    (["--suite", "speed,bogus"], "unknown suite"),
    (["--threads", "0"], "--threads"),
    (["--steps", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--dtype", "float16"], "--dtype"),
    (["--lengths", "8,x"], "--lengths"),
    (["--max-point-seconds", "-1"], "--max-point-seconds"),
    (["--max-batch", "rtrl-fast=8"], "--max-batch"),
    (["--max-batch", "rtrl-dense=0"], "--max-batch"),
])
def test_parse_args_rejects_invalid(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)

    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_parse_args_rejects_missing_cuda(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])

    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_parse_args_tiny_defaults():
    args = parse_args(["--tiny"])

    assert args.config == TINY
    assert args.steps < 20
    assert args.sweeps.lengths == (8, 16)
    assert parse_args(["--tiny", "--steps", "7", "--lengths", "3"]).steps == 7
    assert parse_args(["--lengths", "3,5"]).sweeps.lengths == (3, 5)
    assert parse_args(["--max-batch", "rtrl-dense=8", "--max-batch", "bptt=2"]).max_batch == \
        [("rtrl-dense", 8), ("bptt", 2)]


@pytest.mark.parametrize("measured, status", [(None, "n/a"), (14.9, "FAIL"), (15.0, "PASS")])
def test_at_least_status(measured, status):
    assert at_least("speed-up", measured, 15.0)["status"] == status


def test_memory_flatness_cases():
    flat = {64: 100.0, 4096: 105.0}
    rising = {64: 10.0, 4096: 400.0}

    assert memory_flatness(flat, rising)["status"] == "PASS"
    assert memory_flatness(rising, rising)["status"] == "FAIL"
    assert memory_flatness(flat, flat)["status"] == "FAIL"
    assert memory_flatness({64: 1.0}, {64: 2.0})["status"] == "n/a"


def test_crossover_length_first_exceeding():
    assert crossover_length({8: 1, 16: 5, 32: 9}, {8: 4, 16: 4, 32: 4}) == 16
    assert crossover_length({8: 1, 16: 2}, {8: 4, 16: 4}) is None
