"""DAGM in pixels: the masked reverse process, POM's control of its samples, the generator's resumable
training and `hdm generate`."""

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import save, wait_while_running
from PIL import Image
from scipy import ndimage

from hdm._cli import main
from hdm._config import resolve
from hdm._dagm import blob, crop_box, defect_mask, foreground, regenerate
from hdm._diffusion import GaussianDiffusion, strided_timesteps
from hdm._generator import PixelGenerator, from_pixels, make_defects, to_pixels, with_sampling
from hdm._layouts import DataSource
from hdm._unet import PixelUNet

HDM = [sys.executable, "-m", "hdm"]
# A tiny generator: 64-pixel images, 16-pixel crops, an 8-wide UNet.
TINY = ["--set", "space.image_size=64", "--set", "generator.width=8", "--set", "generator.mults=1,1,1,1",
        "--set", "generator.crop_size=16", "--set", "generator.batch_size=4", "--set", "generator.mask_window=32",
        "--set", "generator.sample_steps=3", "--set", "generator.checkpoint_every=5"]


def tiny_config(**values):
    base = {"space.image_size": 64, "generator.width": 8, "generator.mults": (1, 1, 1, 1), "generator.crop_size": 16,
            "generator.mask_window": 32, "generator.sample_steps": 3}
    return resolve(None, {**base, **values})


@pytest.fixture
def normals(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "normal"
    for i in range(4):
        stripes = np.tile((np.arange(64) % 16 < 8)[None, :, None] * 120 + 60, (64, 1, 3)).astype(np.uint8)
        save(folder / f"{i:03d}.png", np.clip(stripes + rng.integers(0, 20, stripes.shape), 0, 255).astype(np.uint8))
    return folder


def test_crop_box_covers_the_mask_with_context_in_multiples_of_the_stride():
    mask = np.zeros((64, 64), bool)
    mask[30:35, 50:60] = True
    rows, cols = crop_box(mask, multiple=8, margin=4)
    assert rows.start <= 26 and rows.stop >= 39 and cols.start <= 46 and cols.stop == 64
    assert (rows.stop - rows.start) % 8 == 0 and (cols.stop - cols.start) % 8 == 0
    whole = crop_box(np.ones((60, 60), bool), multiple=8, margin=4)
    assert all(s.start >= 0 and s.stop <= 60 and (s.stop - s.start) % 8 == 0 for s in whole)


def test_default_masks_are_blobs_on_the_part_within_the_window():
    part = np.zeros((64, 64, 3), np.uint8)
    part[16:48, 20:52] = 150  # a grey part on a black backdrop
    on_part = part[..., 0] > 0
    assert np.array_equal(foreground(part), on_part)
    assert foreground(np.full((64, 64, 3), 90, np.uint8)).all()  # a surface filling the frame is all part
    grain = np.random.default_rng(0).integers(0, 256, (64, 64, 1)).repeat(3, 2).astype(np.uint8)
    assert foreground(grain).all()  # and so is a textured one, whose border is no backdrop
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = defect_mask(part, 24, rng)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.any() and not (mask & ~on_part).any()
        assert rows[-1] - rows[0] < 24 and cols[-1] - cols[0] < 24
        assert ndimage.label(mask)[1] == 1  # one region, not a cluster of specks


def test_a_lit_backdrop_is_not_part():
    rows = np.arange(64, dtype=np.float32)[:, None, None]
    scene = np.broadcast_to(120 + 1.5 * rows, (64, 64, 3)).copy()  # lit from below: 120 to 215
    scene[20:44, 20:44] = (30, 40, 160)  # a blue plate
    part = np.zeros((64, 64), bool)
    part[20:44, 20:44] = True
    assert np.array_equal(foreground(scene.astype(np.uint8)), part)


def test_a_blob_is_one_solid_region_inside_its_square():
    rng = np.random.default_rng(0)
    for side in (8, 40, 160):
        for _ in range(20):
            shape = blob(side, rng)
            assert shape.shape == (side, side) and shape.any()
            assert ndimage.label(shape)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(shape), shape)
            assert not (shape[0].any() or shape[-1].any() or shape[:, 0].any() or shape[:, -1].any())


def test_regeneration_changes_only_the_masked_region():
    torch.manual_seed(0)
    net = PixelUNet(3, 8, (1, 1, 1, 1))
    torch.nn.init.normal_(net.out.weight, std=0.1)  # a zero output layer would make every sample the posterior mean
    process = GaussianDiffusion.linear(1000, 1e-4, 0.02).respaced(strided_timesteps(500, 4))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:20, 4:28] = 1
    out = regenerate(x0, mask, net, process, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out * (1 - mask), x0 * (1 - mask))
    assert ((out - x0).abs() * mask).sum() > 1.0
    again = regenerate(x0, mask, net, process, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_the_guide_keeps_the_starts_coarse_content_and_redraws_the_detail():
    torch.manual_seed(0)
    net = PixelUNet(3, 8, (1, 1, 1, 1))
    torch.nn.init.normal_(net.out.weight, std=0.1)
    process = GaussianDiffusion.linear(1000, 1e-4, 0.02).respaced(strided_timesteps(700, 4))
    x0 = torch.full((1, 3, 32, 32), -0.6)
    x0[..., 8:24] = 0.6  # a coarse shape: a bright band
    x0 += 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))  # and fine grain
    mask = torch.ones(1, 1, 32, 32)

    def draw(guide):
        return regenerate(x0, mask, net, process, tau=1.0, generator=torch.Generator().manual_seed(0), guide=guide)

    def coarse_gap(x):
        return (torch.nn.functional.avg_pool2d(x - x0, 8)).abs().mean()

    guided, free = draw(4), draw(0)
    assert coarse_gap(guided) < 0.25 * coarse_gap(free)
    assert (guided - x0).abs().mean() > 0.1  # the detail is drawn again, not copied
    with pytest.raises(ValueError, match="generator.guide must be 0 or a power of two"):
        resolve(None, {"generator.guide": 3})


def test_pixel_scale_round_trips_uint8_images():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert to_pixels(image).shape == (3, 5, 7) and to_pixels(image).abs().max() <= 1
    assert np.array_equal(from_pixels(to_pixels(image)), image)


def test_defects_keep_the_image_outside_the_mask_and_grey_surfaces_grey():
    torch.manual_seed(0)
    model = PixelGenerator(tiny_config(**{"generator.change_low": 0.0, "generator.change_high": 1e9}), grayscale=True)
    torch.nn.init.normal_(model.unet.out.weight, std=0.1)
    grey = np.repeat(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8), 3, axis=3)
    defects, rejected = make_defects(model, grey, count=3, seed=5, progress=False)
    assert len(defects) == 3 and rejected == 0 and [d.source for d in defects] == [0, 1, 0]
    for defect in defects:
        outside = ~defect.mask
        assert np.array_equal(defect.image[outside], grey[defect.source][outside])
        assert not np.array_equal(defect.image[defect.mask], grey[defect.source][defect.mask])
        assert (defect.image[..., :1] == defect.image).all()
    again, _ = make_defects(model, grey, count=3, seed=5, progress=False)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(defects, again))


@pytest.mark.parametrize("start", ["appearance", "normal"])
def test_the_region_starts_as_an_appearance_anomaly_or_as_the_image(start, monkeypatch):
    """What the reverse process starts from: the image outside the mask either way; inside it, pasted
    content (another image here) for "appearance", the image itself for "normal"; and from how far."""
    import hdm._generator as generator_module

    seen = []

    def recording(x0, mask, net, process, *args):
        seen.append((x0.clone(), mask.clone(), process.timestep_map[-1].item()))
        return x0

    monkeypatch.setattr(generator_module, "regenerate", recording)
    model = PixelGenerator(tiny_config(**{"generator.start": start, "generator.change_low": 0.0}))
    flat = np.full((3, 64, 64, 3), 128, np.uint8)
    flat[1], flat[2] = 30, 220  # the others a paste can come from
    make_defects(model, flat, count=1, seed=0, tau=0.0, progress=False)
    x0, mask, t_from = seen[0]
    inside = mask.expand_as(x0).bool()
    image = to_pixels(np.full((1, 1, 1, 3), 128, np.uint8)).flatten()[0]
    assert torch.all(x0[~inside] == image)
    assert torch.any(x0[inside] != image) == (start == "appearance")
    assert t_from == (400 if start == "appearance" else 700)


def test_pom_rejects_samples_outside_the_band_and_raises_tau_when_they_are_too_small():
    torch.manual_seed(0)
    model = PixelGenerator(tiny_config(**{"generator.change_low": 1e6, "generator.change_high": 2e6,
                                          "generator.attempts": 3}))
    images = np.full((1, 64, 64, 3), 128, np.uint8)
    defects, rejected = make_defects(model, images, count=2, seed=0, tau=1.0, progress=False)
    assert defects == [] and rejected == 6
    model = PixelGenerator(tiny_config(**{"generator.change_low": 0.0, "generator.change_high": 1e9}))
    torch.nn.init.normal_(model.unet.out.weight, std=0.1)
    low = make_defects(model, images, count=1, seed=0, tau=0.0, progress=False)[0][0]
    assert low.tau == 0.0
    model.config.generator.change_low = low.change * 1.02  # the first draw at tau 0 is now too small
    model.config.generator.attempts = 40
    raised = make_defects(model, images, count=1, seed=0, tau=0.0, progress=False)[0]
    assert raised and raised[0].tau > 0.0


def _fit(run, normals, *extra):
    return [*HDM, "fit-generator", "--run", str(run), "--normal-dir", str(normals), "--steps", "40", *TINY, *extra]


def test_generator_fit_killed_resumes_to_the_weights_of_an_uninterrupted_fit(tmp_path, normals):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_fit(whole, normals, "-q"), check=True, capture_output=True)
    process = subprocess.Popen(_fit(killed, normals, "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "generator_state.pt"
    wait_while_running(process, state.exists)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 40 and not (killed / "generator.pt").exists()

    refused = CliRunner().invoke(main, ["fit-generator", "--run", str(killed), "--normal-dir", str(normals)])
    assert refused.exit_code != 0 and "interrupted generator fit" in refused.output
    resumed = subprocess.run([*HDM, "fit-generator", "--run", str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {step}" in resumed.stderr and not state.exists()
    weights = [torch.load(run / "generator.pt", weights_only=True)["state"] for run in (whole, killed)]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6) for k in weights[0])
    again = CliRunner().invoke(main, ["fit-generator", "--run", str(killed)])
    assert again.exit_code != 0 and "already holds a generator" in again.output


@pytest.fixture
def tiny_run(tmp_path, normals):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit-generator", "--run", str(run), "--normal-dir", str(normals), "--steps", "5",
                                       "-q", *TINY, "--set", "generator.change_low=0", "--set",
                                       "generator.change_high=1e9"])
    assert result.exit_code == 0, result.output
    return run


def test_generate_writes_an_mvtec_layout_set_that_a_seed_reproduces(tmp_path, tiny_run):
    out = tmp_path / "sets" / "made"
    args = ["generate", "--run", str(tiny_run), "--count", "5", "--seed", "3", "--with-normals", "-q"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = sorted((out / "test" / "generated").iterdir())
    masks = sorted((out / "ground_truth" / "generated").iterdir())
    assert [p.name for p in images] == [f"{k:04d}.png" for k in range(5)]
    assert [p.name for p in masks] == [f"{k:04d}_mask.png" for k in range(5)]
    rows = list(csv.DictReader((out / "generated.csv").open()))
    assert len(rows) == 5 and all(float(r["change"]) > 0 for r in rows)
    # the training images in turn (the calibration hold-out is not among them), each written once
    assert len(list((out / "test" / "good").iterdir())) == len({r["source"] for r in rows}) == 2
    for image, mask, row in zip(images, masks, rows):
        pixels, m = np.asarray(Image.open(image)), np.asarray(Image.open(mask)) > 127
        normal = np.asarray(Image.open(row["source"]))
        assert m.any() and np.array_equal(pixels[~m], normal[~m])
    # a category in the MVTec AD layout that `hdm test --data sets --category made` reads
    samples = DataSource.detect(tmp_path / "sets", "made").test_samples()
    assert sorted(s.label for s in samples) == [0, 0, 1, 1, 1, 1, 1]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 3 * 160 and sheet.size[1] >= 5 * 160

    again = tmp_path / "again"
    assert CliRunner().invoke(main, [*args, "--out", str(again)]).exit_code == 0
    assert all((out / p).read_bytes() == (again / p).read_bytes()
               for p in ("test/generated/0004.png", "ground_truth/generated/0004_mask.png"))
    refused = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert refused.exit_code != 0 and "already holds a generated set" in refused.output


def test_a_run_with_a_generator_shows_its_samples_in_the_report(tiny_run):
    from hdm._report import generated_section
    from hdm._runs import report_samples

    defects = report_samples(tiny_run, "cpu")
    assert len(defects) == 6 and all(d.mask.any() for d in defects)
    section = generated_section(defects)
    assert "Generated defects" in section and section.count('alt="generated defect"') == 6
    assert report_samples(tiny_run.parent, "cpu") is None  # no generator, no row


def test_generate_takes_the_users_masks(tmp_path, tiny_run, normals):
    masks = tmp_path / "masks"
    for path in sorted(normals.iterdir()):
        mask = np.zeros((64, 64), np.uint8)
        mask[8:24, 30:50] = 255
        save(masks / f"{path.stem}_mask.png", mask)
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["generate", "--run", str(tiny_run), "--count", "4", "--out", str(out), "--images",
                                       str(normals), "--mask-dir", str(masks), "-q"])
    assert result.exit_code == 0, result.output
    for k in range(4):
        written = np.asarray(Image.open(out / "ground_truth" / "generated" / f"{k:04d}_mask.png")) > 127
        assert written[8:24, 30:50].all() and written.sum() == 16 * 20


def _one_line_error(args, expected):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_generate_bad_input_is_one_line(tmp_path, tiny_run, normals):
    out = ["--out", str(tmp_path / "set")]
    _one_line_error(["generate", "--run", str(tmp_path), "--count", "2", *out], "no generator in this run")
    _one_line_error(["generate", "--run", str(tiny_run), "--mask-dir", str(tmp_path), *out], "give both")
    _one_line_error(["generate", "--run", str(tiny_run), "--count", "0", *out], "at least 1")
    masks = tmp_path / "masks"
    masks.mkdir()
    base = ["generate", "--run", str(tiny_run), "--images", str(normals), "--mask-dir", str(masks), *out]
    _one_line_error(base, "no mask images")
    square = np.zeros((64, 64), np.uint8)
    square[:8, :8] = 255
    for name in ("000", "001", "002"):
        save(masks / f"{name}.png", square)
    _one_line_error(base, "no mask for 003.png")
    save(masks / "003.png", square)
    save(masks / "zzz.png", square)
    _one_line_error(base, "matches no image")
    (masks / "zzz.png").unlink()
    save(masks / "003.png", np.zeros((64, 64), np.uint8))
    _one_line_error(base, "mask is empty")
    save(masks / "003.png", np.zeros((20, 64), np.uint8))
    _one_line_error(base, "different aspect ratio")


def test_generator_settings_are_checked_in_one_line(tmp_path, normals):
    base = ["fit-generator", "--run", str(tmp_path / "run"), "--normal-dir", str(normals)]
    _one_line_error([*base, "--crop-size", "20"], "generator.crop_size must be a multiple of 8")
    _one_line_error([*base, "--set", "generator.t_start=0"], "generator.t_start must lie inside")
    _one_line_error([*base, "--set", "generator.mults=1,2"], "generator.mults must be 4")
    _one_line_error(["fit-generator", "--run", str(tmp_path / "none")], "holds no model to take the data from")


def test_the_detector_draws_on_the_runs_generator_when_asked(tmp_path, tiny_run, normals):
    fit = ["fit", "--normal-dir", str(normals), "--out", str(tiny_run), "--image-size", "64", "--steps", "3",
           "--batch-size", "4", "--set", "dagm.pixel_share=1.0"]
    # The fit draws with its own sampling settings, here the wide band the generator was made with.
    fit += ["--set", "generator.change_low=0", "--set", "generator.change_high=1e9"]
    result = CliRunner().invoke(main, fit)
    assert result.exit_code == 0, result.output + result.stderr
    # every slot of the pool: 2 training images x 2 anomalies each, all accepted in the test's wide band
    assert "4 appearance anomalies (4 by the pixel generator)" in result.stderr
    quiet = [*fit, "-q"]
    _one_line_error([*quiet[:4], str(tmp_path / "elsewhere"), *quiet[5:]], "draws on the run's generator: train it first")
    _one_line_error([*quiet, "--overwrite", "--holdout", "0.75"], "trained on other images than this fit")
    _one_line_error([*quiet, "--overwrite", "--image-size", "96"], "makes 64-pixel images, this fit's are 96")


def test_the_api_fits_a_generator_and_generates(tmp_path, normals):
    import hdm

    settings = {"space.image_size": 64, "generator.width": 8, "generator.mults": (1, 1, 1, 1), "generator.crop_size": 16,
                "generator.batch_size": 4, "generator.steps": 5, "generator.mask_window": 32,
                "generator.sample_steps": 3, "generator.change_low": 0.0, "generator.change_high": 1e9}
    hdm.fit_generator(tmp_path / "run", normal_dir=normals, settings=settings)
    defects = hdm.generate(tmp_path / "run", 3, out=tmp_path / "set", seed=1)
    assert len(defects) == 3 and all(isinstance(d, hdm.Defect) for d in defects)
    assert all(d.image.shape == (64, 64, 3) and d.mask.shape == (64, 64) for d in defects)
    assert len(list((tmp_path / "set" / "test" / "generated").iterdir())) == 3


def test_a_generator_trained_earlier_draws_with_the_callers_sampling_settings():
    old = PixelGenerator(tiny_config(**{"generator.start": "normal", "generator.tau": 4.0}), grayscale=True)
    torch.nn.init.normal_(old.unet.out.weight, std=0.1)
    now = with_sampling(old, tiny_config().generator)
    assert now.t_from == 400 and now.config.generator.tau == 0.0 and bool(now.grayscale)
    assert old.t_from == 700 and old.config.generator.tau == 4.0  # the stored model is left as it was
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), now.state_dict().values()))
    assert with_sampling(now, tiny_config().generator) is now  # the same settings: nothing rebuilt
