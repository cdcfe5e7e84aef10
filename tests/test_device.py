"""The device a run computes on: chosen by name, refused in one line when this machine lacks it."""

import pytest
import torch
from click.testing import CliRunner

from hdm._cli import main
from hdm._data import HDMInputError
from hdm._device import device_of, resolve_device


def test_auto_picks_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))


@pytest.mark.parametrize("name, message", [("tpu", "not one of"), ("cuda:x", "not one of"), ("gpu0", "not one of")])
def test_unknown_devices_are_one_line(name, message):
    with pytest.raises(HDMInputError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "cuda"])
    assert result.exit_code != 0 and "has no CUDA device" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_device_of_reads_a_module_and_defaults_to_the_cpu():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(object()) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bf16_off_cuda_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "cpu",
                                       "--precision", "bf16"])
    assert result.exit_code != 0 and "bf16 needs a CUDA device" in result.output and "Traceback" not in result.output


def test_the_bf16_path_trains_and_keeps_the_prior_in_fp32(tmp_path, monkeypatch):
    """The autocast path, exercised on the CPU (where users are refused it only because it is slow there)."""
    import hdm._device
    import hdm._train
    from hdm._config import HDMConfig
    from hdm._data import list_images
    from hdm._synthetic import CATEGORY, make_default_dataset

    config = HDMConfig()
    config.space.image_size, config.train.steps, config.train.batch_size = 64, 3, 4
    config.dagm.warmup_fraction = 0.0  # diffusion-made content from the first step
    monkeypatch.setattr(hdm._device, "check_precision", lambda precision, device: None)
    data = make_default_dataset(tmp_path, n_train=4, n_test_good=0, n_per_defect=0, size=64)
    model, history = hdm._train.fit(config, list_images(data / CATEGORY / "train" / "good"), progress=False,
                                   log=lambda m: None, precision="bf16")
    assert model.precision == "bf16" and all(v == v for v in history.summary().values())  # no NaN
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        logits, prior = model.voices(images)
        model.precision = "fp32"
        logits32, prior32 = model.voices(images)
    assert logits.dtype == prior.dtype == torch.float32
    assert torch.allclose(prior, prior32, atol=0.05) and torch.allclose(logits, logits32, atol=0.5)
