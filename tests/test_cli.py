"""End-to-end through the command line on tiny generated data (seconds, not minutes)."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_onnx_parity
from PIL import Image

from hdm._cli import main
from hdm._metrics import METRIC_KEYS
from hdm._synthetic import CATEGORY, DEFECT_TYPES, make_default_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_default_dataset(root / "data", n_train=6, n_test_good=3, n_per_defect=1, size=96)
    run = root / "run"
    result = CliRunner().invoke(main, ["fit", "--data", str(data), "--category", CATEGORY, "--out", str(run),
                                       "--steps", "3", "--batch-size", "4", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    # Off a terminal (as here, or in CI's log) progress comes as whole lines, not carriage-return redraws.
    assert "\r" not in result.output and "train: 3/3 (100%)" in result.output
    assert result.output.count("train: 0/3") == 1  # one line per redraw, none extra for the loss figures
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
    assert 0.0 <= metrics["image_recall_at_threshold"] <= 1.0
    assert metrics["calibration"]["target_fpr"] == pytest.approx(0.01)
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_quiet_leaves_only_the_results(trained):
    _, run = trained
    result = CliRunner().invoke(main, ["test", "--run", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| model |")
    assert "test: 0/" not in result.output and "metrics in" not in result.output


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
    assert list(rows[0]) == ["path", "score", "probability", "decision", "defect_pixels", "height", "width"]
    payload = torch.load(run / "model.pt", weights_only=True)
    image_threshold = float(payload["state"]["calibration.image_threshold"])
    pixel_threshold = float(payload["state"]["calibration.pixel_threshold"])
    for row in rows:
        score, probability = float(row["score"]), float(row["probability"])
        assert 0.0 <= score <= 1.0 and 0.0 <= probability <= 1.0
        assert row["decision"] == ("defect" if score >= image_threshold else "ok")
    # The binary mask is the raw map cut at the calibrated pixel threshold.
    mask = np.asarray(Image.open(out / "crack" / "000_mask.png")) > 0
    assert np.array_equal(mask, raw >= pixel_threshold)
    assert int(next(r for r in rows if r["path"].endswith("crack/000.png"))["defect_pixels"]) == mask.sum()


def test_predict_keeps_going_past_bad_files(trained, tmp_path):
    from test_bad_input import REFUSED

    data, run = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, (payload, _) in REFUSED.items():
        (folder / name).write_bytes(payload)
    good = data / CATEGORY / "test" / "good" / "000.png"
    (folder / "fine.png").write_bytes(good.read_bytes())
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(folder), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"{len(REFUSED)} files could not be read" in result.output
    for name, (_, problem) in REFUSED.items():
        assert f"{name}: " in result.output and problem in result.output
    assert (tmp_path / "o" / "fine_overlay.png").is_file()
    assert len(list(csv.DictReader((tmp_path / "o" / "scores.csv").open()))) == 1


@pytest.mark.parametrize("options, message", [
    (["--image-size", "100"], "image_size must be a multiple of 32"),
    (["--target-fpr", "0.7"], "target_fpr must lie in (0, 0.5)"),
    (["--holdout", "1.5"], "holdout must lie in (0, 1)"),
    (["--checkpoint-every", "0"], "checkpoint_every must be > 0"),
    (["--set", "ddm.topk=0.1"], "--set ddm.topk=0.1: unknown setting 'ddm.topk'"),
    (["--set", "train.steps=many"], "train.steps must be an integer, not 'many'"),
    (["--set", "ddm.top_k=0.9", "--set", "ddm.top_k=1.5"], "ddm.top_k must lie in [0, 1)"),
    (["--config", "missing.toml"], "missing.toml: cannot read the configuration file"),
])
def test_bad_options_fail_in_one_line_before_any_work(tmp_path, options, message):
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *options])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_print_config_shows_the_defaults_as_a_file_that_fit_reads_back(tmp_path):
    printed = CliRunner().invoke(main, ["fit", "--print-config"])
    assert printed.exit_code == 0 and "[ddm]\n" in printed.output and "\ntop_k = 0.01\n" in printed.output
    config = tmp_path / "hdm.toml"
    config.write_text(printed.output.replace("top_k = 0.01", "top_k = 0.03").replace("steps = 800", "steps = 20"))
    # the file over the defaults, a shortcut option over the file, --set over both
    result = CliRunner().invoke(main, ["fit", "--config", str(config), "--steps", "30", "--set", "pom.filtering=false",
                                       "--print-config"])
    assert result.exit_code == 0, result.output
    assert "top_k = 0.03" in result.output and "steps = 30" in result.output and "filtering = false" in result.output


def test_resume_needs_an_interrupted_run(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "no training_state.pt to resume from" in result.output


def test_onnx_export_has_parity_with_torch(trained, tmp_path):
    data, _ = trained
    # The exported graph searches the prior's whole bank, so its torch twin is a run that does too.
    run = tmp_path / "whole-bank"
    result = CliRunner().invoke(main, ["fit", "--data", str(data), "--category", CATEGORY, "--out", str(run),
                                       "--steps", "3", "--batch-size", "4", "--image-size", "64",
                                       "--set", "pom.density_lists=0"])
    assert result.exit_code == 0, result.output
    assert_onnx_parity(run, data / CATEGORY / "test", tmp_path)


def test_predict_needs_exactly_one_model(trained, tmp_path):
    data, run = trained
    result = CliRunner().invoke(main, ["predict", str(data)])
    assert result.exit_code != 0 and "exactly one of --run" in result.output


def test_images_differing_only_by_extension_keep_separate_outputs(trained, tmp_path):
    data, run = trained
    good = np.asarray(Image.open(data / CATEGORY / "test" / "good" / "000.png"))
    Image.fromarray(good).save(tmp_path / "part.png")
    Image.fromarray(good).save(tmp_path / "part.jpg")
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(tmp_path / "part.png"),
                                       str(tmp_path / "part.jpg"), "--out", str(tmp_path / "o"), "--save-maps"])
    assert result.exit_code == 0, result.output
    for name in ("part.png", "part.jpg"):
        assert (tmp_path / "o" / f"{name}_overlay.png").is_file() and (tmp_path / "o" / f"{name}.npy").is_file()
