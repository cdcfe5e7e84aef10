import pytest
import torch

from hdm._config import HDMConfig
from hdm._data import list_images
from hdm._synthetic import CATEGORY, make_default_dataset
from hdm._dagm import Provenance, SyntheticBatch
from hdm._train import fit, refinement_inputs


def tiny_config(seed: int, kind: str = "feature") -> HDMConfig:
    config = HDMConfig()
    config.space.kind = kind
    config.space.image_size = 64 if kind == "feature" else 32
    config.train.steps = 4
    config.train.batch_size = 4
    config.train.seed = seed
    config.dagm.warmup_fraction = 0.0  # exercise the diffusion-made content from the first step
    return config


@pytest.fixture(params=["feature", "identity"])
def kind(request) -> str:
    """Each training test in the feature space and in the test-only identity space."""
    if request.param == "identity":
        request.getfixturevalue("identity_space")
    return request.param


def test_same_seed_same_model_other_seed_other_model(tmp_path, kind):
    data = make_default_dataset(tmp_path, n_train=4, n_test_good=0, n_per_defect=0, size=64)
    paths = list_images(data / CATEGORY / "train" / "good")
    runs = [fit(tiny_config(seed, kind), paths, progress=False, log=lambda m: None)[0].trained_state()
            for seed in (1, 1, 2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_training_logs_losses_and_tau(tmp_path, kind):
    data = make_default_dataset(tmp_path, n_train=4, n_test_good=0, n_per_defect=0, size=64)
    _, history = fit(tiny_config(0, kind), list_images(data / CATEGORY / "train" / "good"), progress=False, log=lambda m: None)
    summary = history.summary()
    assert len(history.losses) == 4 and len(history.tau) == 4
    assert {"loss_simple", "loss_vlb", "loss_focal", "loss_l1", "loss_image", "tau"} <= set(summary)
    # the refinement trains where the space has a guide to draw edges from
    assert ("loss_refine_focal" in summary) == (kind == "feature")
    assert all(v == v for v in summary.values())  # no NaN


def test_a_dropped_synthetic_sample_feeds_the_refinement_as_normal():
    """POM's filter reverts a rejected sample to normal: its appearance features must not reach the
    refinement beside the "normal" target it now has."""
    z0, z = torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)
    source = torch.tensor([Provenance.APPEARANCE, Provenance.APPEARANCE, Provenance.DIFFUSION])
    batch = SyntheticBatch(z, torch.ones(3, 1, 8, 8), torch.ones(3), source)
    batch.revert(torch.tensor([True, False, True]), z0)
    assert batch.label.tolist() == [0.0, 1.0, 0.0] and batch.mask[0].sum() == 0 and torch.equal(batch.z[0], z0[0])
    normal_fine, appearance_fine = torch.zeros(3, 5, 8, 8), torch.ones(3, 5, 8, 8)
    fine, weight = refinement_inputs(batch, normal_fine, appearance_fine, diffusion_weight=0.5)
    assert torch.equal(fine[0], normal_fine[0]) and torch.equal(fine[1], appearance_fine[1])
    assert weight.tolist() == [1.0, 1.0, 1.0]
