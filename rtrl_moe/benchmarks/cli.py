"""Command line of ``python -m rtrl_moe.benchmarks``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from rtrl_moe.benchmarks.config import (ALL_METHODS, FULL_SWEEPS, RTRL_METHODS, SUITES,
                                        THESIS2, TINY, TINY_SWEEPS, resolve_device,
                                        resolve_dtype)
from rtrl_moe.benchmarks.floor import run_floor
from rtrl_moe.benchmarks.memory import run_memory
from rtrl_moe.benchmarks.meta import busy_cpu_warning, collect_meta
from rtrl_moe.benchmarks.report import ROWS, render_markdown, render_text, write_csv, write_json
from rtrl_moe.benchmarks.sweeps import run_batch, run_scaling
from rtrl_moe.benchmarks.timing import run_speed

logger = logging.getLogger("rtrl_moe.benchmarks")

DEFAULT_STEPS, DEFAULT_WARMUP = 20, 5
TINY_STEPS, TINY_WARMUP = 3, 1
DEFAULT_MAX_POINT_SECONDS = 300.0


def parse_suites(text: str) -> tuple[str, ...]:
    """Parse a comma-separated suite list ("all" for every suite) in run order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one suite name")
    if "all" in names:
        return SUITES
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suite(s) {', '.join(unknown)}; expected a comma-separated list of "
            f"{', '.join(SUITES)} or 'all'")
    return tuple(suite for suite in SUITES if suite in names)


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def parse_lengths(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of sequence lengths (each >= 1)."""
    parse = _integer(1)
    lengths = tuple(parse(part.strip()) for part in text.split(",") if part.strip())
    if not lengths:
        raise argparse.ArgumentTypeError("expected at least one length")
    return lengths


def parse_batch_cap(text: str) -> tuple[str, int]:
    """Parse ``METHOD=N``: the largest batch size at which the batch suite times METHOD."""
    method, separator, size = text.partition("=")
    if not separator or method not in ALL_METHODS:
        raise argparse.ArgumentTypeError(
            f"expected METHOD=N with METHOD one of {', '.join(ALL_METHODS)}, got {text!r}")
    return method, _integer(1)(size)


def parse_seconds(text: str) -> float:
    """Parse a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the benchmark command."""
    parser = argparse.ArgumentParser(
        prog="python -m rtrl_moe.benchmarks",
        description="Time and size the BPTT and RTRL engines on the thesis-2 RecurrentMoE "
                    "(d_model=64, 8 slots, 16 experts, top-2 everywhere) with random one-hot "
                    "inputs, and write results.json, one CSV per suite, plots and summary.md.")
    parser.add_argument("--suite", type=parse_suites, default=SUITES, metavar="LIST",
                        help=f"comma-separated suites from {', '.join(SUITES)}, or 'all' "
                             "(default: all)")

    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device to run on (default: cpu)")
    parser.add_argument("--threads", type=_integer(1), default=2,
                        help="torch intra-op threads, also used by the memory subprocesses "
                             "(default: 2, fixed so that runs on different machines compare)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating point type of the model and data (default: float32)")

    parser.add_argument("--steps", type=_integer(1), default=None,
                        help=f"timed steps per point; for BPTT the window length "
                             f"(default: {DEFAULT_STEPS}, {TINY_STEPS} with --tiny)")
    parser.add_argument("--warmup", type=_integer(0), default=None,
                        help=f"untimed steps before the timed ones (default: {DEFAULT_WARMUP}, "
                             f"{TINY_WARMUP} with --tiny)")
    parser.add_argument("--lengths", type=parse_lengths, default=None, metavar="LIST",
                        help="comma-separated sequence lengths of the memory suite "
                             f"(default: {','.join(map(str, FULL_SWEEPS.lengths))}, "
                             f"{','.join(map(str, TINY_SWEEPS.lengths))} with --tiny)")
    parser.add_argument("--max-point-seconds", type=parse_seconds,
                        default=DEFAULT_MAX_POINT_SECONDS, metavar="SECONDS",
                        help="in the scaling and batch suites, stop a point and record it as "
                             "skipped when its projected run time exceeds this many seconds; "
                             f"0 disables the limit (default: {DEFAULT_MAX_POINT_SECONDS:g})")
    parser.add_argument("--max-batch", type=parse_batch_cap, action="append", default=[],
                        metavar="METHOD=N",
                        help="in the batch suite, skip METHOD at batch sizes above N, for "
                             "example rtrl-dense=8; repeat for several methods (default: none)")
    parser.add_argument("--seed", type=_integer(0), default=0,
                        help="seed of the model initialisation and the inputs (default: 0)")
    parser.add_argument("--tiny", action="store_true",
                        help="use a very small model, sweeps and step counts so that every "
                             "suite finishes in seconds (for smoke tests)")

    parser.add_argument("--out", type=Path, default=Path("figures/benchmarks"),
                        help="output directory (default: figures/benchmarks)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the blocks of suites not run now from an existing "
                             "results.json in the output directory")
    parser.add_argument("--quiet", action="store_true",
                        help="log warnings and errors only; the final table is still printed")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; fill the defaults that depend on ``--tiny``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    args.dtype = resolve_dtype(args.dtype)
    if args.steps is None:
        args.steps = TINY_STEPS if args.tiny else DEFAULT_STEPS
    if args.warmup is None:
        args.warmup = TINY_WARMUP if args.tiny else DEFAULT_WARMUP
    sweeps = TINY_SWEEPS if args.tiny else FULL_SWEEPS
    args.sweeps = sweeps if args.lengths is None else replace(sweeps, lengths=args.lengths)
    args.config = TINY if args.tiny else THESIS2
    return args


def run_suites(args: argparse.Namespace, meta: dict) -> dict:
    """Run the selected suites in order; return the results by suite name."""
    common = {"steps": args.steps, "warmup": args.warmup, "device": args.device,
              "dtype": args.dtype, "seed": args.seed}
    limit = args.max_point_seconds or None
    results = {"meta": meta}
    for suite in args.suite:
        logger.info("suite %s: start", suite)
        start = time.perf_counter()
        if suite == "speed":
            block = run_speed(args.config, **common)
        elif suite == "floor":
            block = run_floor(results.get("speed"), args.config, RTRL_METHODS, **common)
        elif suite == "scaling":
            block = run_scaling(args.config, n_slots=args.sweeps.n_slots,
                                n_experts=args.sweeps.n_experts, max_seconds=limit, **common)
        elif suite == "batch":
            block = run_batch(args.config, batch_sizes=args.sweeps.batch_sizes,
                              max_seconds=limit, max_batch=dict(args.max_batch), **common)
        else:
            # The length sweep is the measurement, so memory points have no time limit.
            block = run_memory(args.config, lengths=args.sweeps.lengths, device=args.device,
                               dtype=args.dtype, seed=args.seed)
        block["wall_seconds"] = time.perf_counter() - start
        block["meta"] = meta
        results[suite] = block
        logger.info("suite %s: done in %.1f s", suite, block["wall_seconds"])
    return results


def merge_previous(results: dict, path: Path) -> dict:
    """Add the suite blocks of an earlier ``results.json`` that this run did not produce."""
    if not path.exists():
        return results
    with open(path, encoding="utf-8") as handle:
        previous = json.load(handle)
    merged = dict(results)
    for suite in SUITES:
        if suite not in merged and suite in previous:
            merged[suite] = previous[suite]
    return merged


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """Write results.json, one CSV per suite, the plots and summary.md; return the paths."""
    from rtrl_moe.benchmarks.plots import write_plots  # matplotlib loads only when writing

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    write_json(results, written[0])
    for suite in SUITES:
        if suite in results:
            path = out_dir / f"{suite}.csv"
            write_csv(ROWS[suite](results[suite]), path)
            written.append(path)
    plots = write_plots(results, out_dir)
    written += [out_dir / name for names in plots.values() for name in names]
    summary = out_dir / "summary.md"
    summary.write_text(render_markdown(results, plots), encoding="utf-8")
    written.append(summary)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command; return the exit status (0 also when a target fails)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    torch.set_num_threads(args.threads)
    meta = collect_meta(args.device, args.dtype, sys.argv[1:] if argv is None else argv)
    meta["tiny"] = args.tiny
    warning = busy_cpu_warning(meta)
    if warning and args.device.type == "cpu":
        logger.warning("%s", warning)

    results = run_suites(args, meta)
    if args.merge:
        results = merge_previous(results, args.out / "results.json")
    written = write_outputs(results, args.out)
    logger.info("wrote %d files under %s", len(written), args.out)
    print(render_text(results))
    return 0
