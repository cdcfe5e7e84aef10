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

from ._config import HDMConfig
from ._data import HDMInputError

CHECKPOINT_FORMAT = "hdm-checkpoint"
CHECKPOINT_VERSION = 4  # 2: calibration buffers and configuration; 3: stride-4 statistics and refinement;
# 4: POM's density prior
TRAINING_STATE_FORMAT = "hdm-training-state"
TRAINING_STATE_VERSION = 4  # 2: the DDM's head and refinement saved together; 3: DAGM's four appearance families;
# 4: every data-parallel rank's random state
GENERATOR_FORMAT, GENERATOR_VERSION = "hdm-generator", 1
GENERATOR_STATE_FORMAT, GENERATOR_STATE_VERSION = "hdm-generator-state", 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files private (0600); written files get the usual permissions instead.
FILE_MODE = 0o666 & ~_umask()


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
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
    # Level 1: overlays and masks are written per image on predict's hot path, where zlib's default
    # level costs far more time than the few percent of file size it saves.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    write_bytes_atomic(path, buffer.getvalue())


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())


def _save_payload(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _load_payload(path: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Read a torch file with weights_only=True and check that it is `fmt` at `version`."""
    if not path.is_file():
        raise HDMInputError(f"{path}: {what} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise HDMInputError(f"{path}: not a loadable hdm {what} ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise HDMInputError(f"{path}: not an hdm {what}")
    if payload.get("version") != version:
        raise HDMInputError(f"{path}: {what} format version {payload.get('version')} is not supported "
                            f"(this hdm reads version {version})")
    return payload


def save_checkpoint(path: Path, config: HDMConfig, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
    _save_payload(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.to_dict(),
                         "state": state, "extra": extra or {}})


def parse_config(path: Path, data: Any) -> HDMConfig:
    """A stored configuration (a checkpoint's or a training state's) -> HDMConfig."""
    if isinstance(data, dict) and isinstance(data.get("pom"), dict):
        # Runs saved before the bank was split into lists searched the whole bank, and before the
        # radius measured the raw distance.
        data["pom"].setdefault("density_lists", 0)
        data["pom"].setdefault("density_neighbours", 0)
    try:
        return HDMConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise HDMInputError(f"{path}: stored configuration is invalid ({exc})") from None


def load_checkpoint(path: Path) -> tuple[HDMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint with weights_only=True; refuse anything that is not an hdm checkpoint."""
    payload = _load_payload(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")
    return parse_config(path, payload["config"]), payload["state"], payload.get("extra", {})


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    _save_payload(path, {"format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION, **state})


def load_training_state(path: Path) -> dict[str, Any]:
    """The state an interrupted `fit` resumes from (same safety checks as a checkpoint)."""
    return _load_payload(path, TRAINING_STATE_FORMAT, TRAINING_STATE_VERSION, "training state")


def load_model(path: Path):
    from ._model import HDM

    config, state, extra = load_checkpoint(path)
    model = HDM(config)
    model.load_trained_state(state)
    model.eval()
    return model, extra


def save_generator(path: Path, config: HDMConfig, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    _save_payload(path, {"format": GENERATOR_FORMAT, "version": GENERATOR_VERSION, "config": config.to_dict(),
                         "state": state, "extra": extra})


def load_generator(path: Path):
    """The pixel generator of a run (`hdm fit-generator`), with what the run recorded about it."""
    from ._generator import PixelGenerator

    payload = _load_payload(path, GENERATOR_FORMAT, GENERATOR_VERSION, "generator")
    model = PixelGenerator(parse_config(path, payload["config"]))
    model.load_state_dict(payload["state"])
    model.eval()
    return model, payload.get("extra", {})


def save_generator_state(path: Path, state: dict[str, Any]) -> None:
    _save_payload(path, {"format": GENERATOR_STATE_FORMAT, "version": GENERATOR_STATE_VERSION, **state})


def load_generator_state(path: Path) -> dict[str, Any]:
    return _load_payload(path, GENERATOR_STATE_FORMAT, GENERATOR_STATE_VERSION, "generator training state")
