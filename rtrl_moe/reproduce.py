"""Run every notebook headlessly with papermill: ``python -m rtrl_moe.reproduce``.

Notebooks run in file-name order. On the CPU the executed notebooks replace the
stored ones in ``notebooks/`` and figures go to ``figures/``; these are the
outputs that ``pytest --nbval`` compares. On CUDA (``--device cuda``, or
``auto`` with a GPU present) the executed notebooks and their figures go to
``results-gpu/`` instead, so a GPU run never replaces the CPU-generated outputs.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import time
from pathlib import Path

import nbformat

logger = logging.getLogger("rtrl_moe.reproduce")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
GPU_RESULTS = ROOT / "results-gpu"
VOLATILE_CELL_KEYS = ("papermill", "execution")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rtrl_moe.reproduce",
        description="Execute the notebooks in order and regenerate every figure and table.")
    parser.add_argument("--only", default=None,
                        help="comma-separated notebook prefixes to run, e.g. 01,03 (default: all)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"),
                        help="override a parameter of the notebooks that define it; VALUE is "
                             "a Python literal (e.g. -p SEEDS '[0,1,2,3,4,5,6,7]')")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device for the notebooks (default: cuda when available)")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="execution timeout per cell in seconds (default 3600)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="write executed notebooks and figures here instead of in place "
                             "(default on CUDA: results-gpu/)")
    args = parser.parse_args(argv)
    if args.timeout < 1:
        parser.error(f"--timeout must be >= 1 second, got {args.timeout}")
    return args


def select_notebooks(only: str | None) -> list[Path]:
    """Return the notebooks to run, in order; raise ``ValueError`` for an unknown prefix."""
    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only is None:
        return notebooks
    prefixes = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [nb for nb in notebooks if any(nb.name.startswith(p) for p in prefixes)]
    missing = [p for p in prefixes if not any(nb.name.startswith(p) for nb in notebooks)]
    if missing:
        names = ", ".join(nb.name for nb in notebooks)
        raise ValueError(f"no notebook starts with {', '.join(missing)}; available: {names}")
    return chosen


def notebook_parameters(path: Path) -> dict[str, object]:
    """Return the names and default values of the notebook's ``parameters`` cell."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} must have exactly one cell tagged 'parameters', "
                         f"found {len(cells)}")
    values: dict[str, object] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def parse_overrides(pairs: list[list[str]], notebooks: list[Path]) -> dict[str, object]:
    """Parse ``NAME VALUE`` pairs; raise ``ValueError`` for a name no selected notebook defines."""
    defaults: dict[str, object] = {}
    for path in notebooks:
        defaults.update(notebook_parameters(path))
    overrides: dict[str, object] = {}
    for name, text in pairs:
        if name not in defaults:
            raise ValueError(f"unknown parameter {name!r}; the selected notebooks define: "
                             f"{', '.join(sorted(defaults))}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            # A bare word is accepted only where the default is a string (DEVICE=cuda).
            if not isinstance(defaults[name], str):
                raise ValueError(f"parameter {name} must be a Python literal like its default "
                                 f"{defaults[name]!r}, got {text!r}") from None
            overrides[name] = text
    return overrides


def resolve_device(device: str) -> str:
    """Return ``cpu`` or ``cuda``; raise ``ValueError`` if CUDA is asked for but absent."""
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ValueError("--device cuda was given but torch.cuda.is_available() is False")
    if device == "auto":
        return "cuda" if available else "cpu"
    return device


def strip_volatile_metadata(path: Path) -> None:
    """Remove papermill's timings and execution timestamps so diffs show real changes."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
    nbformat.write(nb, path)


def run_notebook(path: Path, output: Path, parameters: dict[str, object], timeout: int) -> None:
    """Execute one notebook with papermill from the notebooks folder.

    The run writes to ``build/`` first and replaces ``output`` only on success,
    so a failed run leaves the stored notebook as it was (the partial result
    stays in ``build/`` for inspection).
    """
    import papermill

    scratch = ROOT / "build" / path.name
    scratch.parent.mkdir(exist_ok=True)
    papermill.execute_notebook(
        str(path), str(scratch), parameters=parameters, kernel_name="python3",
        cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=timeout,
        request_save_on_cell_execute=False)
    strip_volatile_metadata(scratch)
    scratch.replace(output)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        notebooks = select_notebooks(args.only)
        overrides = parse_overrides(args.parameter, notebooks)
        device = resolve_device(args.device)
    except ValueError as error:
        logger.error("error: %s", error)
        return 2

    # Progress bars inside the notebooks would be stored in their outputs; the
    # runner reports progress per notebook instead.
    os.environ["RTRL_MOE_QUIET"] = "1"
    logging.getLogger("papermill").setLevel(logging.WARNING)

    out_dir = args.output_dir or (GPU_RESULTS if device == "cuda" else None)
    if out_dir is not None:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        logger.info("writing executed notebooks and figures to %s", out_dir)

    for index, path in enumerate(notebooks, start=1):
        own = notebook_parameters(path)
        parameters = {k: v for k, v in overrides.items() if k in own}
        if "DEVICE" in own and device != own["DEVICE"]:
            parameters["DEVICE"] = device
        if out_dir is not None and "FIGURES_DIR" in own:
            parameters["FIGURES_DIR"] = str((out_dir / "figures").resolve())
        output = path if out_dir is None else out_dir / path.name

        logger.info("[%d/%d] %s %s", index, len(notebooks), path.name,
                    parameters if parameters else "")
        start = time.perf_counter()
        try:
            run_notebook(path, output, parameters, args.timeout)
        except Exception as error:  # papermill wraps kernel errors in several types
            cell = getattr(error, "exec_count", None)
            where = f" in cell {cell}" if cell is not None else ""
            logger.error("FAILED: %s%s: %s", path.name, where,
                         getattr(error, "evalue", None) or error)
            return 1
        logger.info("        done in %.0f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
