"""Evaluation metrics: image and pixel AUROC, pixel AUPRO (FPR <= 0.3), pixel AP, F1-max."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1max", "pixel_f1max")


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(f1.max())


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, bins: int = 1000) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: N x H x W bool; maps: N x H x W float. Each connected component of every ground-truth
    mask is one region; PRO at a threshold is the mean over regions of the fraction of the region
    above it, and FPR is measured on all normal pixels. Thresholds are `bins` quantiles of the
    scores, plus exact interpolation at the FPR limit.
    """
    masks = masks.astype(bool)
    if not masks.any() or masks.all():
        raise ValueError("AUPRO needs both defective and normal pixels")
    edges = np.unique(np.quantile(maps, np.linspace(0, 1, bins + 1)))
    # bin index b means score in [edges[b], edges[b+1]); thresholds are the edges.
    level = np.clip(np.searchsorted(edges, maps, side="right") - 1, 0, len(edges) - 1)
    n_levels = len(edges)

    normal_counts = np.bincount(level[~masks], minlength=n_levels)
    # Pixels scoring >= edges[i] sit in levels i.. : reversed cumulative sums.
    fpr = np.cumsum(normal_counts[::-1])[::-1] / max(1, normal_counts.sum())

    region_pro = []
    for mask, lv in zip(masks, level):
        labelled, count = ndimage.label(mask)
        if count == 0:
            continue
        counts = np.bincount(labelled[mask] * n_levels + lv[mask], minlength=(count + 1) * n_levels)
        counts = counts.reshape(count + 1, n_levels)[1:]
        region_pro.append(np.cumsum(counts[:, ::-1], axis=1)[:, ::-1] / counts.sum(1, keepdims=True))
    pro = np.concatenate(region_pro).mean(0)

    # Walk from high thresholds (low FPR) to low ones; start the curve at (0, 0).
    fpr, pro = np.concatenate([[0.0], fpr[::-1]]), np.concatenate([[0.0], pro[::-1]])
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < len(fpr):
        nxt = keep.sum()
        y_end = np.interp(fpr_limit, [fpr[nxt - 1], fpr[nxt]], [pro[nxt - 1], pro[nxt]])
        x, y = np.append(x, fpr_limit), np.append(y, y_end)
    return float(np.trapezoid(y, x) / fpr_limit)


def compute_metrics(image_labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """All six metrics; image_* need both classes, pixel_* need defective and normal pixels."""
    image_labels = np.asarray(image_labels).astype(int)
    pixel_labels = masks.reshape(-1).astype(bool)
    pixel_scores = maps.reshape(-1).astype(np.float64)
    return {
        "image_auroc": float(roc_auc_score(image_labels, image_scores)),
        "pixel_auroc": float(roc_auc_score(pixel_labels, pixel_scores)),
        "pixel_aupro": aupro(masks, maps),
        "pixel_ap": float(average_precision_score(pixel_labels, pixel_scores)),
        "image_f1max": f1_max(image_labels, image_scores),
        "pixel_f1max": f1_max(pixel_labels, pixel_scores),
    }


def threshold_metrics(image_labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                      image_threshold: float, pixel_threshold: float) -> dict[str, float]:
    """What the calibrated decisions do on a labelled set: recall and false-alarm rates at the thresholds.

    `pixel_normal_part_fpr` is the fraction of normal images whose binary mask is not empty, the
    rate the pixel threshold was calibrated for.
    """
    labels = np.asarray(image_labels).astype(bool)
    flagged = np.asarray(image_scores) >= image_threshold
    masked = maps >= pixel_threshold
    rate = lambda values: float(values.mean()) if values.size else float("nan")  # noqa: E731
    return {
        "image_recall_at_threshold": rate(flagged[labels]),
        "image_fpr_at_threshold": rate(flagged[~labels]),
        "pixel_recall_at_threshold": rate(masked[masks]),
        "pixel_fpr_at_threshold": rate(masked[~masks]),
        "pixel_normal_part_fpr": rate(masked.reshape(len(labels), -1).any(1)[~labels]),
    }


def per_type_metrics(defect_types: list[str], image_labels: np.ndarray, image_scores: np.ndarray,
                     masks: np.ndarray, maps: np.ndarray) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC and AUPRO of each defect type against all normal images, and the
    number of images of that type. Types whose masks are all empty get image AUROC only."""
    labels = np.asarray(image_labels).astype(bool)
    types = np.asarray(defect_types)
    out = {}
    for kind in sorted(set(types[labels])):
        chosen = ~labels | (types == kind)
        out[str(kind)] = {"images": int((types == kind).sum()),
                          **_subset_metrics(chosen, labels, image_scores, masks, maps)}
    return out


def per_group_metrics(groups: list[str], image_labels: np.ndarray, image_scores: np.ndarray,
                      masks: np.ndarray, maps: np.ndarray) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC and AUPRO within each group of test images (its own normal and
    defective images, unlike `per_type_metrics`), with its image counts. A group with one class only
    gets no image AUROC; one without defect pixels gets no pixel metrics."""
    labels = np.asarray(image_labels).astype(bool)
    groups = np.asarray(groups)
    out = {}
    for group in sorted(set(groups)):
        chosen = groups == group
        out[str(group)] = {"images": int(chosen.sum()), "defective": int(labels[chosen].sum()),
                           **_subset_metrics(chosen, labels, image_scores, masks, maps)}
    return out


def _subset_metrics(chosen: np.ndarray, labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray,
                    maps: np.ndarray) -> dict[str, float]:
    """Image AUROC where the chosen images hold both classes; pixel AUROC and AUPRO where their masks
    hold both defect and normal pixels."""
    row = {}
    if 0 < labels[chosen].sum() < chosen.sum():
        row["image_auroc"] = float(roc_auc_score(labels[chosen], np.asarray(image_scores)[chosen]))
    if masks[chosen].any() and not masks[chosen].all():
        row["pixel_auroc"] = float(roc_auc_score(masks[chosen].reshape(-1), maps[chosen].reshape(-1)))
        row["pixel_aupro"] = aupro(masks[chosen], maps[chosen])
    return row
