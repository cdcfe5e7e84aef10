"""POM's calibration: thresholds and probabilities from normal images only."""

import numpy as np
import pytest
import torch
from scipy import stats

from hdm._config import HDMConfig
from hdm._data import Sample, list_images
from hdm._inference import calibrate, predict_samples
from hdm._layouts import holdout_split
from hdm._pom import Calibration, fit_normal_tail
from hdm._synthetic import CATEGORY, make_default_dataset
from hdm._train import fit


def test_probability_crosses_one_minus_target_exactly_at_the_threshold():
    rng = np.random.default_rng(0)
    scores = 1 / (1 + np.exp(-rng.normal(-2.0, 0.5, 40)))
    calibration = Calibration()
    calibration.fit(scores, scores + 0.05, target_fpr=0.02)
    threshold = calibration.image_threshold
    assert calibration.probability(threshold).item() == pytest.approx(0.98, abs=1e-4)
    grid = torch.linspace(0.01, 0.99, 50)
    assert (calibration.probability(grid).diff() >= 0).all()
    assert calibration.decision(threshold * 1.001) and not calibration.decision(threshold * 0.999)
    assert calibration.pixel_threshold > calibration.image_threshold


def test_few_held_out_images_give_a_wider_threshold():
    rng = np.random.default_rng(1)
    values = 1 / (1 + np.exp(-rng.normal(0.0, 1.0, 400)))
    _, _, many = fit_normal_tail(values, 0.01)
    _, _, few = fit_normal_tail(values[:5], 0.01)
    assert few > many


def test_gaussian_logit_scores_meet_the_target_rate():
    """With scores whose logits are truly Gaussian, the prediction bound keeps its promise on average."""
    rng = np.random.default_rng(2)
    rates = []
    for _ in range(200):
        held = 1 / (1 + np.exp(-rng.normal(0.3, 0.7, 20)))
        fresh = 1 / (1 + np.exp(-rng.normal(0.3, 0.7, 500)))
        rates.append((fresh >= fit_normal_tail(held, 0.05)[2]).mean())
    assert np.mean(rates) == pytest.approx(0.05, abs=0.01)


def test_holdout_split_is_seeded_disjoint_and_refuses_too_few(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(30)]
    train, holdout = holdout_split(paths, 0.1, seed=3)
    assert len(holdout) == 3 and set(train).isdisjoint(holdout) and len(train) + len(holdout) == 30
    assert holdout_split(paths, 0.1, seed=3) == (train, holdout)
    assert holdout_split(paths, 0.1, seed=4)[1] != holdout
    with pytest.raises(Exception, match="too few"):
        holdout_split(paths[:2], 0.1, seed=0)


def test_false_alarm_rate_on_fresh_normal_images_matches_the_target(tmp_path):
    """Train on generated normal parts, calibrate on held-out ones, count false alarms on 300 fresh ones."""
    target = 0.05
    data = make_default_dataset(tmp_path, seed=5, n_train=90, n_test_good=300, n_per_defect=0, size=64)
    config = HDMConfig()
    config.space.image_size = 64
    config.train.steps = 40
    config.train.batch_size = 8
    train, holdout = holdout_split(list_images(data / CATEGORY / "train" / "good"), 0.5, seed=0)
    model, _ = fit(config, train, progress=False, log=lambda m: None)
    calibrate(model, holdout, target, progress=False)
    fresh = [Sample(p, 0) for p in list_images(data / CATEGORY / "test" / "good")]
    predictions = list(predict_samples(model, fresh, progress=False, calibrated=True))
    image_alarms = sum(p.decision for p in predictions)
    part_alarms = sum(bool(p.map.max() >= model.pixel_threshold) for p in predictions)
    for alarms in (image_alarms, part_alarms):
        # Measured 11 and 11 of 300 (15 expected); a two-sided test, so too few alarms fail as well.
        assert stats.binomtest(alarms, len(fresh), target).pvalue > 0.001, (image_alarms, part_alarms)
