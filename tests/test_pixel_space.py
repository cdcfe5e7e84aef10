"""HDM in pixel space (`hdm fit --space pixel`): z is the image, the denoiser and DDM's head are UNets,
and the run goes through the same fit, test, report, export and predict as a feature-space run."""

import torch
from click.testing import CliRunner
from conftest import assert_onnx_parity

from hdm._cli import main
from hdm._config import resolve
from hdm._model import HDM
from hdm._space import PixelSpace
from hdm._unet import PixelUNet, UNetHead

TINY = ["--space", "pixel", "--image-size", "32", "--set", "space.unet_width=8", "--set", "space.unet_mults=1,1,2,2"]


def test_the_pixel_model_maps_images_to_a_probability_per_pixel():
    config = resolve(None, {"space.kind": "pixel", "space.image_size": 32, "space.unet_width": 8,
                            "space.unet_mults": (1, 1, 2, 2)})
    model = HDM(config).eval()
    assert isinstance(model.space, PixelSpace) and isinstance(model.denoiser, PixelUNet)
    assert isinstance(model.ddm.head, UNetHead) and model.ddm.refinement is None and model.density is None
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.space.raw(images).z, images * 2 - 1)
    with torch.no_grad():
        logits, prior = model.voices(images)
        maps, scores = model(images)
    assert logits.shape == (2, 1, 32, 32) and prior is None  # one logit per pixel, no density prior
    assert maps.shape == (2, 1, 32, 32) and scores.shape == (2,) and ((maps >= 0) & (maps <= 1)).all()


def test_pixel_space_sizes_are_checked_before_any_work():
    for values, words in (({"space.image_size": 36}, "multiple of the UNet's stride"),
                          ({"space.unet_width": 4}, "space.unet_width must be >= 8")):
        result = CliRunner().invoke(main, ["fit", "--space", "pixel", "--print-config",
                                           *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]])
        assert result.exit_code != 0 and words in result.output


def test_a_pixel_run_fits_tests_and_exports_with_onnx_parity(tiny_mvtec, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "--data", str(tiny_mvtec), "--category", "cat", "--out", str(run),
                                       "--steps", "3", "--batch-size", "2", *TINY, "-q"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["test", "--run", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.json").exists() and (run / "report.html").exists()
    assert assert_onnx_parity(run, tiny_mvtec / "cat" / "test", tmp_path) == 3
