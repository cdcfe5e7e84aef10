import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from hdm._metrics import (METRIC_KEYS, aupro, compute_metrics, f1_max, per_group_metrics, per_type_metrics,
                         threshold_metrics)


def test_image_and_pixel_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 16, 16)) < 0.1
    maps = rng.random((6, 16, 16)) + masks * 0.3
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = rng.random(6) + labels * 0.2
    m = compute_metrics(labels, scores, masks, maps)
    assert set(m) == set(METRIC_KEYS)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert m["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    best = max(f1_score(labels, scores >= s) for s in scores)
    assert m["image_f1max"] == pytest.approx(best)
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_f1_max_of_a_perfect_ranking_is_one():
    assert f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)


def _two_regions():
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 2:6, 2:6] = True  # region A, 16 px
    masks[0, 12:18, 12:18] = True  # region B, 36 px
    return masks


def test_aupro_of_a_perfect_map_is_one():
    masks = _two_regions()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-6)


def test_aupro_averages_regions_not_pixels():
    # Region A is found at every threshold, the larger region B never: PRO is 0.5 whatever the FPR.
    masks = _two_regions()
    maps = np.zeros((1, 20, 20))
    maps[0, 2:6, 2:6] = 1.0
    rng = np.random.default_rng(0)
    maps[0][~masks[0]] = rng.uniform(0.0, 0.5, (~masks[0]).sum())
    maps[0, 12:18, 12:18] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=0.01)


def test_aupro_of_a_map_that_ranks_normal_pixels_first_is_zero():
    masks = _two_regions()
    maps = np.where(masks, 0.0, 1.0)
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-6)


def test_aupro_with_half_of_a_region_detected():
    # Half of the single region scores above all normal pixels, the other half below all of them:
    # PRO is 0.5 for FPR in (0, 1), so the normalised area up to 0.3 is 0.5.
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 0:4, 0:4] = True
    maps = np.full((2, 10, 10), 0.5) + np.linspace(0, 0.1, 200).reshape(2, 10, 10)
    maps[0, 0:2, 0:4] = 2.0
    maps[0, 2:4, 0:4] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=0.01)


def test_aupro_needs_both_classes():
    with pytest.raises(ValueError):
        aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


def test_threshold_metrics_count_what_the_decisions_do():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.7, 0.2])
    maps = np.zeros((4, 2, 2))
    maps[1, 0, 0] = 0.9  # a normal part with one flagged pixel
    maps[2] = [[0.9, 0.9], [0.1, 0.1]]
    masks = np.zeros((4, 2, 2), bool)
    masks[2, 0] = masks[3, 1] = True
    out = threshold_metrics(labels, scores, masks, maps, image_threshold=0.5, pixel_threshold=0.5)
    assert out["image_recall_at_threshold"] == 0.5 and out["image_fpr_at_threshold"] == 0.5
    assert out["pixel_recall_at_threshold"] == 0.5  # 2 of the 4 defect pixels
    assert out["pixel_fpr_at_threshold"] == 1 / 12
    assert out["pixel_normal_part_fpr"] == 0.5


def _scored_set():
    """Six images: two normal and one defective in each of groups a and b; b's maps are pure noise."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 0, 0, 1])
    masks = np.zeros((6, 8, 8), bool)
    masks[2, 2:5, 2:5] = masks[5, 4:7, 1:4] = True
    maps = rng.random((6, 8, 8)) * 0.5
    maps[2] += masks[2]  # group a: the defect is found
    scores = maps.reshape(6, -1).max(1)
    scores[5] = 0.0  # group b: the defective image scores lowest
    return ["a", "a", "a", "b", "b", "b"], labels, scores, masks, maps


def test_per_group_metrics_compare_each_group_with_its_own_normals():
    groups, labels, scores, masks, maps = _scored_set()
    out = per_group_metrics(groups, labels, scores, masks, maps)
    assert out["a"]["images"] == 3 and out["a"]["defective"] == 1
    assert out["a"]["image_auroc"] == 1.0 and out["a"]["pixel_auroc"] == 1.0
    assert out["b"]["image_auroc"] == 0.0 and out["b"]["pixel_auroc"] < 0.9


def test_per_type_metrics_compare_each_type_with_all_normals():
    _, labels, scores, masks, maps = _scored_set()
    types = ["good", "good", "a", "good", "good", "b"]
    out = per_type_metrics(types, labels, scores, masks, maps)
    assert set(out) == {"a", "b"} and out["a"]["images"] == 1
    assert out["a"]["image_auroc"] == 1.0 and out["b"]["image_auroc"] == 0.0
