"""Many runs at once on this machine (`--engine local`): the table, skipping finished runs, a bad
category failing alone, and the options' one-line errors. The Ray engine: tests/test_cluster.py."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hdm._cli import main
from hdm._data import HDMInputError
from hdm._layouts import categories
from hdm._synthetic import CATEGORY, make_default_dataset


def test_categories_of_mvtec_like_and_visa_roots(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "mvtec" / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "mvtec" / "license_files").mkdir()
    assert categories(tmp_path / "mvtec") == ["a", "b"]
    (tmp_path / "visa" / "split_csv").mkdir(parents=True)
    (tmp_path / "visa" / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,train,normal,c/1.png,\npcb1,test,normal,p/1.png,\ncandle,test,normal,c/2.png,\n")
    assert categories(tmp_path / "visa") == ["candle", "pcb1"]
    with pytest.raises(HDMInputError, match="no categories"):
        categories(tmp_path / "mvtec" / "a" / "train")
    with pytest.raises(HDMInputError, match="not found"):
        categories(tmp_path / "nowhere")


def test_many_runs_fail_alone_skip_when_done_and_leave_one_table(tmp_path):
    data = make_default_dataset(tmp_path / "data", n_train=6, n_test_good=3, n_per_defect=1, size=64)
    (data / "empty" / "train" / "good").mkdir(parents=True)
    out = tmp_path / "runs"
    command = ["fit", "--data", str(data), "--category", "all", "--out", str(out), "--steps", "2",
               "--batch-size", "4", "--image-size", "64"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 1
    assert f"fit: {CATEGORY} done" in first.output and "fit: empty failed: " in first.output
    rows = {r["category"]: r for r in json.loads((out / "fits.json").read_text())["runs"]}
    assert rows[CATEGORY]["state"] == "done" and rows[CATEGORY]["seed"] is None
    assert 0 <= rows[CATEGORY]["metrics"]["pixel_aupro"] <= 1 and rows[CATEGORY]["fit_seconds"] > 0
    assert rows["empty"]["state"] == "failed" and "no images found" in rows["empty"]["reason"]
    assert (out / CATEGORY / "model.pt").is_file() and (out / CATEGORY / "report.html").is_file()
    assert "| empty | – | failed |" in (out / "fits.md").read_text()

    # A run fitted but not yet tested is tested; one tested is skipped.
    (out / CATEGORY / "metrics.json").unlink()
    again = CliRunner().invoke(main, [*command[:4], CATEGORY, *command[5:], "--engine", "local"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "fits.json").read_text())["runs"][0]["state"] == "done"
    assert (out / CATEGORY / "metrics.json").is_file()
    third = CliRunner().invoke(main, [*command[:4], CATEGORY, *command[5:], "--engine", "local"])
    assert third.exit_code == 0 and f"fit: {CATEGORY} already done" in third.output


@pytest.mark.parametrize("options, message", [
    (["--seeds", "0,x"], "--seeds 0,x: expected integers"),
    (["--seeds", "0", "--seed", "1"], "not both"),
    (["--category", "a,a"], "named twice"),
    (["--category", "a,b", "--resume", "r"], "run the same command again to resume"),
    (["--category", "a,b", "--address", "auto"], "for --engine ray"),
    (["--engine", "ray", "--device", "cpu"], "give no --device"),
    (["--workers", "2"], "--workers trains one run on a Ray cluster: give --engine ray"),
    (["--workers", "2", "--engine", "ray", "--category", "all"], "one --category"),
    (["--workers", "2", "--engine", "ray", "--device", "cpu"], "no --device"),
])
def test_bad_many_run_options_fail_in_one_line(tmp_path, options, message):
    (tmp_path / "a" / "train" / "good").mkdir(parents=True)
    command = ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "runs")]
    command += [] if "--category" in options else ["--category", "a"]
    result = CliRunner().invoke(main, [*command, *options])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_without_ray_the_ray_engine_asks_for_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    (tmp_path / "a" / "train" / "good").mkdir(parents=True)
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), "--category", "a", "--out",
                                       str(tmp_path / "runs"), "--engine", "ray"])
    assert result.exit_code != 0 and "pip install 'hdm[ray]'" in result.output


def test_manifests_round_trip_and_default_their_output_names(tmp_path):
    from hdm._predict import Target, read_manifest, resolve_targets, write_manifest

    targets = [Target(tmp_path / "a" / "1.png", Path("a/1")), Target(tmp_path / "b.jpg", Path("b"))]
    for name in ("m.csv", "m.parquet"):
        write_manifest(targets, tmp_path / name)
        assert read_manifest(tmp_path / name) == targets
        assert resolve_targets([tmp_path / name]) == targets
    (tmp_path / "paths.csv").write_text("path\n/data/line 1/x.png\nrel/y.tif\n")
    assert [str(t.relative) for t in read_manifest(tmp_path / "paths.csv")] == ["data/line 1/x", "rel/y"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(HDMInputError, match="bad.csv: a manifest needs a 'path' column"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(HDMInputError, match="a manifest is a .csv or .parquet file"):
        write_manifest(targets, tmp_path / "m.txt")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(HDMInputError, match="broken.parquet: not a readable Parquet manifest"):
        read_manifest(tmp_path / "broken.parquet")


def test_index_writes_the_names_predict_would_use(tmp_path):
    data = make_default_dataset(tmp_path / "data", n_train=2, n_test_good=1, n_per_defect=1, size=32)
    test = data / CATEGORY / "test"
    result = CliRunner().invoke(main, ["index", str(test), "--out", str(tmp_path / "paths.csv")])
    assert result.exit_code == 0 and "index: 6 images" in result.output
    rows = (tmp_path / "paths.csv").read_text().splitlines()
    assert rows[0] == "path,output" and f"{test / 'crack' / '000.png'},crack/000" in rows
