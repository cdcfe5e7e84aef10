"""The space seam is real: a second space (the identity over tiny images, tests/conftest.py) goes through
the model, a fit, a test and a prediction with nothing in hdm knowing which space it is."""

import numpy as np
import pytest
import torch

import hdm
from hdm._config import HDMConfig
from hdm._model import HDM


@pytest.mark.usefixtures("identity_space")
def test_the_model_runs_in_the_identity_space():
    config = HDMConfig()
    config.space.kind, config.space.image_size = "identity", 32
    model = HDM(config).eval()
    assert model.ddm.refinement is None and model.space.lift is None
    with torch.no_grad():
        head, prior = model.voices(torch.rand(2, 3, 32, 32))
        maps, scores = model(torch.rand(2, 3, 32, 32))
    assert head.shape == prior.shape == (2, 1, 32, 32)
    assert maps.shape == (2, 1, 32, 32) and scores.shape == (2,)
    # nothing of the space is frozen, so everything it holds is saved with a run
    assert {"space.z_mean", "space.z_std"} <= set(model.trained_state())


@pytest.mark.usefixtures("identity_space")
def test_a_run_in_the_identity_space_fits_tests_and_predicts(tiny_mvtec, tmp_path):
    settings = {"space.kind": "identity", "space.image_size": 32, "train.steps": 3, "train.batch_size": 2,
                "pom.density_bank": 64}
    run = hdm.fit(tiny_mvtec, "cat", out=tmp_path / "run", settings=settings, device="cpu")
    metrics = hdm.test(run.path, report=False, device="cpu")
    assert 0.0 <= metrics.image_auroc <= 1.0 and 0.0 <= metrics.pixel_auroc <= 1.0
    detector = hdm.load(run.path, device="cpu")
    verdicts = detector.predict(tiny_mvtec / "cat" / "test")
    assert len(verdicts) == 3
    assert all(v.map.shape == v.mask.shape == (40, 48) and np.isfinite(v.map).all() for v in verdicts)


def test_a_run_saved_before_the_seam_still_loads():
    """Runs made before the space seam named the guide's statistics after the stride-4 stage."""
    config = HDMConfig()
    config.space.image_size = 64
    saved = HDM(config).trained_state()
    saved["space.guide_mean"] = torch.randn_like(saved["space.guide_mean"])
    old = {k.replace("space.guide_", "space.fine_"): v for k, v in saved.items()}
    model = HDM(config)
    model.load_trained_state(old)
    assert torch.equal(model.space.guide_mean, saved["space.guide_mean"])


@pytest.mark.usefixtures("identity_space")
def test_a_run_saved_before_the_inverted_file_searches_its_whole_bank(tmp_path):
    from hdm._store import load_model, save_checkpoint

    config = HDMConfig()
    config.space.kind, config.space.image_size, config.pom.density_bank = "identity", 32, 64
    path = tmp_path / "model.pt"
    save_checkpoint(path, config, HDM(config).trained_state())
    payload = torch.load(path, weights_only=True)
    del payload["config"]["pom"]["density_lists"]
    payload["state"] = {k: v for k, v in payload["state"].items() if "centroids" not in k and "list_ends" not in k}
    torch.save(payload, path)
    model, _ = load_model(path)
    assert model.config.pom.density_lists == 0 and model.density.probe == 0
