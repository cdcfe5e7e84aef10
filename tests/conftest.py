import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hdm._space import SPACES, Encoded, Space

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

torch.set_num_threads(2)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def wait_while_running(process: subprocess.Popen, ready, seconds: float = 300) -> None:
    """Poll until `ready()` while `process` still runs (`seconds` at most); a process that ends first
    fails the test with its stderr where it was captured."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None, process.stderr.read()[-2000:] if process.stderr else "the process ended first"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def assert_onnx_parity(run: Path, images: Path, tmp_path: Path) -> int:
    """Export `run` to ONNX, `hdm predict` `images` with the run and with the graph, and check that
    decisions match and scores and saved maps agree to 1e-4; returns how many images were scored."""
    import csv

    from click.testing import CliRunner

    from hdm._cli import main

    onnx_file = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(onnx_file)])
    assert result.exit_code == 0, result.output
    outs = {}
    for name, flag in (("torch", ["--run", str(run)]), ("onnx", ["--model", str(onnx_file)])):
        outs[name] = tmp_path / name
        result = CliRunner().invoke(main, ["predict", *flag, str(images), "--out", str(outs[name]), "--save-maps"])
        assert result.exit_code == 0, result.output
    rows = {n: list(csv.DictReader((o / "scores.csv").open())) for n, o in outs.items()}
    assert [r["decision"] for r in rows["torch"]] == [r["decision"] for r in rows["onnx"]]
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4
    maps = list(outs["torch"].rglob("*.npy"))
    assert maps
    for npy in maps:
        assert np.abs(np.load(npy) - np.load(outs["onnx"] / npy.relative_to(outs["torch"]))).max() <= 1e-4
    return len(rows["torch"])


@pytest.fixture
def tiny_mvtec(tmp_path):
    """A 3-normal / 1-good-test / 2-defect MVTec-layout tree of 48x40 RGB images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for i in range(3):
        save(root / "cat" / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    save(root / "cat" / "test" / "good" / "000.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for i in range(2):
        save(root / "cat" / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mask = np.zeros((40, 48), np.uint8)
        mask[10:20, 10:20] = 255
        save(root / "cat" / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


def real_dataset(name: str, category: str) -> Path:
    root = SHARED_DATASETS / name
    if not (root / category).is_dir():
        pytest.skip(f"real data not present at {root / category}")
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outbound connections refused: no code path may download anything."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked inside the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class IdentitySpace(Space):
    """z = the image's pixels (normalised per channel), no guide, no lift, nothing frozen: the trivial
    space that shows the model, DAGM, DDM and training rely on `Space` alone."""

    def __init__(self, config):
        super().__init__(config, channels=3, grid=config.image_size)

    def raw(self, images: torch.Tensor) -> Encoded:
        return Encoded(images)


@pytest.fixture
def identity_space(monkeypatch):
    """`space.kind = "identity"` selects `IdentitySpace` for this test."""
    monkeypatch.setitem(SPACES, "identity", IdentitySpace)
