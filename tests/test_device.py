"""The device a run computes on: chosen by name, refused in one line when this machine lacks it."""

import pytest
import torch
from click.testing import CliRunner

from hdm.cli import main
from hdm.data import HDMInputError
from hdm.device import device_of, resolve_device


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
