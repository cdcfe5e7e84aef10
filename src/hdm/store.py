"""Storage: atomic writes (temporary file in the same folder, then rename) and the checkpoint format."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import HDMConfig
from .data import HDMInputError

CHECKPOINT_FORMAT = "hdm-checkpoint"
CHECKPOINT_VERSION = 1


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_png(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())


def save_checkpoint(path: Path, config: HDMConfig, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "state": state,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[HDMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint with weights_only=True; refuse anything that is not an hdm checkpoint."""
    if not path.is_file():
        raise HDMInputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise HDMInputError(f"{path}: not a loadable hdm checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise HDMInputError(f"{path}: not an hdm checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise HDMInputError(f"{path}: checkpoint format version {payload.get('version')} is not supported "
                            f"(this hdm reads version {CHECKPOINT_VERSION})")
    try:
        config = HDMConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise HDMInputError(f"{path}: checkpoint configuration is invalid ({exc})") from None
    return config, payload["state"], payload.get("extra", {})


def load_model(path: Path):
    from .model import HDM

    config, state, extra = load_checkpoint(path)
    model = HDM(config)
    model.load_trained_state(state)
    model.eval()
    return model, extra
