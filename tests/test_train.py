import torch

from hdm.config import HDMConfig
from hdm.data import list_images
from hdm.synthetic import CATEGORY, make_default_dataset
from hdm.train import fit


def tiny_config(seed: int) -> HDMConfig:
    config = HDMConfig()
    config.space.image_size = 64
    config.train.steps = 4
    config.train.batch_size = 4
    config.train.seed = seed
    config.dagm.warmup_fraction = 0.0  # exercise the diffusion-made content from the first step
    return config


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    data = make_default_dataset(tmp_path, n_train=4, n_test_good=0, n_per_defect=0, size=64)
    paths = list_images(data / CATEGORY / "train" / "good")
    runs = [fit(tiny_config(seed), paths, progress=False, log=lambda m: None)[0].trained_state() for seed in (1, 1, 2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_training_logs_losses_and_tau(tmp_path):
    data = make_default_dataset(tmp_path, n_train=4, n_test_good=0, n_per_defect=0, size=64)
    _, history = fit(tiny_config(0), list_images(data / CATEGORY / "train" / "good"), progress=False, log=lambda m: None)
    summary = history.summary()
    assert len(history.losses) == 4 and len(history.tau) == 4
    assert {"loss_simple", "loss_vlb", "loss_focal", "loss_l1", "loss_image", "tau"} <= set(summary)
    assert all(v == v for v in summary.values())  # no NaN
