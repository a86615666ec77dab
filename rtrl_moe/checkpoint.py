"""Checkpoint files of a training run: atomic writes, safe loads and compatibility checks.

A checkpoint is a dict of plain Python values and tensors, written with
``torch.save`` and read only with ``torch.load(weights_only=True)``, so loading
never runs code from the file. It contains everything a resumed run needs to
continue bitwise identically on CPU. That is the model (class, constructor
arguments, dtype, state dict), the optimizer state and the training config. It
also stores a description of the task, the engine's sequence in progress, the
trainer's position and the state of every random number generator.

:class:`rtrl_moe.training.Trainer` builds and restores the sections; this
module writes, reads and checks them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rtrl_moe.models import DenseRNN, RecurrentMoE

logger = logging.getLogger(__name__)

FORMAT = "rtrl_moe.checkpoint"
FORMAT_VERSION = 1
MODEL_CLASSES: dict[str, type[nn.Module]] = {"RecurrentMoE": RecurrentMoE, "DenseRNN": DenseRNN}

# Config fields that may differ between the saved run and the resumed one,
# because they control how long and how safely the run goes, not its results.
RUN_SETTINGS = ("sequences", "memory_budget", "on_nonfinite")

_SECTIONS = {"model": dict, "optimizer": dict, "config": dict, "task": dict, "engine": dict,
             "trainer": dict, "rng": dict}


class CheckpointError(ValueError):
    """A file is not a usable checkpoint: unreadable, not a checkpoint, or incompatible."""


def write_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically and return the path.

    The payload goes to a temporary file in the same directory, which is
    flushed and synced to disk and then renamed over ``path`` with
    ``os.replace``. A crash at any point leaves either the old file or the
    new one at ``path``, and the temporary file is removed on failure.

    Raises
    ------
    FileNotFoundError
        If the directory of ``path`` does not exist.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "checkpoint directory not found", str(directory))

    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)
    return path


def _sync_directory(directory: Path) -> None:
    """Sync the directory entry of a renamed file to disk, where the OS allows it."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check its format and sections.

    Tensors are loaded on the CPU.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file cannot be unpickled (truncated, corrupted, not written by
        ``torch.save``, or containing objects other than plain values and
        tensors), is not an rtrl_moe checkpoint, has another format version,
        or lacks a section.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch.load raises many exception types on damaged files
        # torch's own message may suggest weights_only=False, which would let an
        # untrusted file run code, so only the exception type is passed on.
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupted or was not "
            f"written by Trainer.save_checkpoint ({type(error).__name__})"
        ) from error

    _check_format(payload, path)
    return payload


def _check_format(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = type(payload).__name__
        raise CheckpointError(f"{path} is not an rtrl_moe checkpoint (it contains a {kind} "
                              f"without format={FORMAT!r})")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}, but this "
                              f"version of rtrl_moe reads version {FORMAT_VERSION}")
    for name, kind in _SECTIONS.items():
        if not isinstance(payload.get(name), kind):
            raise CheckpointError(f"checkpoint {path} is missing its {name!r} section")


def model_section(model: nn.Module) -> dict:
    """Return the model section: class name, constructor arguments, dtype, device, state."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ValueError(f"cannot checkpoint a {name}; supported models: "
                         f"{', '.join(MODEL_CLASSES)}")
    weight = next(model.parameters())
    return {"class": name, "config": model.config(), "dtype": _dtype_name(weight.dtype),
            "device": str(weight.device), "state": model.state_dict()}


def build_model(payload: dict, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the model of a checkpoint with its dtype and parameters.

    ``device`` defaults to the device the model was saved from.

    Raises
    ------
    CheckpointError
        If the class is unknown or the arguments or the state do not fit it.
    """
    section = payload["model"]
    name = section.get("class")
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"checkpoint model class {name!r} is not one of "
                              f"{', '.join(MODEL_CLASSES)}")
    dtype = _dtype_from_name(section.get("dtype"))
    device = torch.device(section.get("device", "cpu") if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"checkpoint model was saved on {device}, but CUDA is not "
                              "available; pass device='cpu'")

    with torch.random.fork_rng(devices=[]):
        try:
            model = MODEL_CLASSES[name](**section["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint model arguments do not fit {name}: {error}") from error
    model = model.to(dtype=dtype, device=device)
    try:
        model.load_state_dict(section["state"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint model state does not fit {name}: {error}") from error
    return model


def check_compatible(payload: dict, model: nn.Module, config: dict, task: Any) -> None:
    """Raise :class:`CheckpointError` naming the first setting where the checkpoint differs.

    Compared: the model class, each constructor argument, the dtype, every
    config field except those in ``RUN_SETTINGS``, and the task.
    """
    section = payload["model"]
    name = type(model).__name__
    if section.get("class") != name:
        raise CheckpointError(f"checkpoint model class {section.get('class')} does not match "
                              f"{name}")
    saved_arguments, arguments = section.get("config", {}), model.config()
    for key in _keys_in_order(arguments, saved_arguments):
        if saved_arguments.get(key) != arguments.get(key):
            raise CheckpointError(f"checkpoint model {key}={saved_arguments.get(key)} does not "
                                  f"match {key}={arguments.get(key)}")
    dtype = _dtype_name(next(model.parameters()).dtype)
    if section.get("dtype") != dtype:
        raise CheckpointError(f"checkpoint dtype {section.get('dtype')} does not match the "
                              f"model dtype {dtype}")

    saved_config = payload["config"]
    for key in _keys_in_order(config, saved_config):
        if key not in RUN_SETTINGS and saved_config.get(key) != config.get(key):
            raise CheckpointError(f"checkpoint {key}={saved_config.get(key)!r} does not match "
                                  f"{key}={config.get(key)!r}")
    check_task(payload, task)


def _keys_in_order(current: dict, saved: dict) -> list[str]:
    """Return the keys of ``current`` in order, then those only ``saved`` has."""
    return list(current) + [key for key in saved if key not in current]


def check_task(payload: dict, task: Any) -> None:
    """Raise :class:`CheckpointError` if ``task`` differs from the checkpoint's task."""
    saved, current = payload["task"], describe_task(task)
    if saved != current:
        raise CheckpointError(f"checkpoint task {_task_text(saved)} does not match task "
                              f"{_task_text(current)}")


def describe_task(task: Any) -> dict:
    """Return the task's class name and, for a dataclass of plain values, its fields."""
    fields = None
    if dataclasses.is_dataclass(task):
        values = {field.name: getattr(task, field.name) for field in dataclasses.fields(task)}
        if all(isinstance(value, (int, float, str, bool, type(None))) for value in values.values()):
            fields = values
    return {"class": type(task).__name__, "fields": fields}


def _task_text(description: dict) -> str:
    fields = description.get("fields")
    if fields is None:
        return str(description.get("class"))
    arguments = ", ".join(f"{key}={value!r}" for key, value in fields.items())
    return f"{description.get('class')}({arguments})"


def capture_rng(generator: torch.Generator) -> dict:
    """Return the states of the data generator and of the global generators.

    The states are tensors, ints, floats and lists, so they load under
    ``weights_only=True``. NumPy's key array becomes a list of ints.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "data": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": [int(key) for key in keys],
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Restore the generator states saved by :func:`capture_rng`.

    CUDA states are restored when the checkpoint has them and this process
    has as many CUDA devices. Otherwise they are skipped with a warning.
    """
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], np.array(numpy["keys"], dtype=np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))

    cuda = state.get("cuda")
    if cuda is None:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    else:
        logger.warning("the checkpoint has CUDA generator states for %d device(s), but this "
                       "process sees %d; they are not restored", len(cuda),
                       torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"checkpoint model dtype {name!r} is not a floating point dtype")
    return dtype
