"""End-to-end through the command line on tiny generated data (seconds, not minutes)."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hdm.cli import main
from hdm.metrics import METRIC_KEYS
from hdm.synthetic import CATEGORY, DEFECT_TYPES, make_default_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_default_dataset(root / "data", n_train=6, n_test_good=3, n_per_defect=1, size=96)
    run = root / "run"
    result = CliRunner().invoke(main, ["fit", "--data", str(data), "--category", CATEGORY, "--out", str(run),
                                       "--steps", "3", "--batch-size", "4", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    return data, run


def test_fit_writes_a_safe_checkpoint(trained):
    _, run = trained
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["format"] == "hdm-checkpoint" and payload["config"]["space"]["image_size"] == 64
    assert not any(k.startswith("space.encoder.") for k in payload["state"])


def test_refuses_to_overwrite_a_run(trained):
    data, run = trained
    result = CliRunner().invoke(main, ["fit", "--data", str(data), "--category", CATEGORY, "--out", str(run)])
    assert result.exit_code != 0 and "already holds a model" in result.output


def test_test_writes_metrics_in_unit_range(trained):
    _, run = trained
    result = CliRunner().invoke(main, ["test", "--run", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["test_images"] == 3 + len(DEFECT_TYPES)


def test_predict_mirrors_folders_and_saves_maps(trained, tmp_path):
    data, run = trained
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(data / CATEGORY / "test"),
                                       "--out", str(out), "--save-maps"])
    assert result.exit_code == 0, result.output
    assert (out / "good" / "000_overlay.png").is_file() and (out / "scratch" / "000_overlay.png").is_file()
    assert (out / "good" / "000_mask.png").is_file()
    raw = np.load(out / "crack" / "000.npy")
    assert raw.dtype == np.float32 and raw.shape == (96, 96)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 3 + len(DEFECT_TYPES)
    assert {r["decision"] for r in rows} <= {"ok", "defect"}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_predict_keeps_going_past_bad_files(trained, tmp_path):
    data, run = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    good = data / CATEGORY / "test" / "good" / "000.png"
    (folder / "fine.png").write_bytes(good.read_bytes())
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(folder), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "broken.png: not a readable image" in result.output
    assert (tmp_path / "o" / "fine_overlay.png").is_file()


def test_bad_options_fail_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--image-size", "100"])
    assert result.exit_code != 0
    assert "image_size must be a multiple of 32" in result.output
    assert "Traceback" not in result.output


def test_onnx_export_has_parity_with_torch(trained, tmp_path):
    data, run = trained
    onnx_file = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(onnx_file)])
    assert result.exit_code == 0, result.output
    outs = {}
    for name, flag in (("torch", ["--run", str(run)]), ("onnx", ["--model", str(onnx_file)])):
        outs[name] = tmp_path / name
        result = CliRunner().invoke(main, ["predict", *flag, str(data / CATEGORY / "test"), "--out", str(outs[name]),
                                           "--save-maps"])
        assert result.exit_code == 0, result.output
    rows = {n: list(csv.DictReader((o / "scores.csv").open())) for n, o in outs.items()}
    assert [r["decision"] for r in rows["torch"]] == [r["decision"] for r in rows["onnx"]]
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4
    for npy in outs["torch"].rglob("*.npy"):
        other = outs["onnx"] / npy.relative_to(outs["torch"])
        assert np.abs(np.load(npy) - np.load(other)).max() <= 1e-4


def test_predict_needs_exactly_one_model(trained, tmp_path):
    data, run = trained
    result = CliRunner().invoke(main, ["predict", str(data)])
    assert result.exit_code != 0 and "exactly one of --run" in result.output
