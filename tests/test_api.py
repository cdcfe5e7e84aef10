"""The public API: the README's example as written, and the detector's typed results."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import hdm
from hdm._metrics import METRIC_KEYS
from hdm._synthetic import make_default_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """The README example, run as written in a folder where `hdm demo` made (a small copy of) its data."""
    folder = tmp_path_factory.mktemp("api")
    make_default_dataset(folder / "hdm-demo" / "data", n_train=8, n_test_good=2, n_per_defect=1, size=96)
    example = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        namespace: dict = {}
        exec(compile(example, str(README), "exec"), namespace)
    return folder / namespace["run"].path, namespace


def test_the_readme_example_runs_as_written(example_run, capsys):
    run, namespace = example_run
    assert (run / "model.pt").is_file() and (run / "metrics.json").is_file()
    assert isinstance(namespace["detector"], hdm.Detector) and isinstance(namespace["verdict"], hdm.ImagePrediction)


def test_predictions_are_typed_and_at_each_images_own_size(example_run, tmp_path):
    run, _ = example_run
    detector = hdm.load(run)
    wide = (np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8)
    grey16 = (np.random.default_rng(1).random((30, 30)) * 65535).astype(np.uint16)
    verdicts = detector.predict([wide, grey16])
    assert [v.source for v in verdicts] == ["array 0", "array 1"]
    assert verdicts[0].map.shape == verdicts[0].mask.shape == (40, 70) and verdicts[1].map.shape == (30, 30)
    for v in verdicts:
        assert v.map.dtype == np.float32 and v.mask.dtype == bool and 0.0 <= v.probability <= 1.0
        assert v.is_defect == (v.score >= float(detector._model.calibration.image_threshold))
        assert np.array_equal(v.mask, v.map >= detector.pixel_threshold)
    batch = detector.predict_batch(torch.rand(2, 3, detector.image_size, detector.image_size))
    assert batch.maps.shape == (2, 1, detector.image_size, detector.image_size) and batch.is_defect.dtype == torch.bool


def test_an_onnx_export_loads_into_the_same_detector(example_run, tmp_path):
    from hdm._export import export_onnx
    from hdm._store import load_model

    run, _ = example_run
    onnx_file = tmp_path / "model.onnx"
    export_onnx(load_model(run / "model.pt")[0], onnx_file)
    images = [(np.random.default_rng(seed).random((50, 60, 3)) * 255).astype(np.uint8) for seed in range(3)]
    whole_bank = hdm.load(run)
    whole_bank._model.density.probe = 0  # the exported graph searches the whole bank, not the inverted file
    in_torch, in_onnx = whole_bank.predict(images), hdm.load(onnx_file).predict(images)
    assert "OnnxDetector" in repr(hdm.load(onnx_file))
    for a, b in zip(in_torch, in_onnx):
        assert np.allclose(a.map, b.map, atol=1e-4) and abs(a.score - b.score) < 1e-4 and a.is_defect == b.is_defect


def test_metrics_serialise_to_the_metrics_json_keys(example_run):
    run, _ = example_run
    metrics = hdm.test(run, report=False)
    assert tuple(metrics.to_dict())[: len(METRIC_KEYS)] == METRIC_KEYS
    assert hdm.Metrics.from_dict(metrics.to_dict()) == metrics


@pytest.mark.parametrize("call, message", [
    (lambda run: hdm.load(run.parent / "nothing"), "neither a run folder"),
    (lambda run: hdm.load(run.parent / "nothing.onnx"), "nothing.onnx: model file not found"),
    (lambda run: hdm.load(shutil.copy(run / "model.pt", run.parent / "model.onnx")), "not a loadable ONNX model"),
    (lambda run: hdm.load(run).predict(np.zeros((4, 4, 3), np.uint8)), "at least 8 x 8"),
    (lambda run: hdm.load(run).predict(run / "missing.png"), "missing.png: file not found"),
    (lambda run: hdm.fit(run, out=run / "again", settings={"train.stepz": 3}), "unknown setting 'train.stepz'"),
])
def test_bad_input_is_one_clear_line(example_run, call, message):
    run, _ = example_run
    with pytest.raises((hdm.HDMInputError, ValueError)) as info:
        call(run)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_public_api_is_what_all_names_and_every_module_is_private():
    package = Path(hdm.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_")) == []
    assert all(getattr(hdm, name) is not None for name in hdm.__all__)
    assert sorted(dir(hdm)) == sorted(hdm.__all__ + ["__version__"])
