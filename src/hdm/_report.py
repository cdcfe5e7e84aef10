"""report.html: one self-contained page that shows at a glance how good a run is.

Everything is inline (SVG plots from matplotlib, JPEG thumbnails as data URIs, CSS), with no
scripts and no external resource, so it opens from disk anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

from ._data import load_image, resize_image
from ._inference import Evaluation
from ._metrics import METRIC_KEYS
from ._pom import logit
from ._predict import colourise
from ._store import write_bytes_atomic

CURVE_POINTS = 400  # curves are thinned to this many points to keep the file small
PIXEL_SAMPLE = 200_000  # pixels per class in the pixel histogram
GROUND_TRUTH_COLOUR = (0, 255, 0)
PREDICTED_COLOUR = (255, 0, 255)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; }
.plots svg { width: 360px; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 200px; font-size: 12px; }
figure img { width: 200px; height: 200px; display: block; }
/* Long file names (a patient id and slice number) are cut to the card's width; the whole name shows on hover. */
.name { display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.miss, .false_alarm { color: #b00; font-weight: bold; } .hit, .ok { color: #070; }
"""


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue and doctype: the SVG is inline


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, CURVE_POINTS).astype(int))
    return x[keep], y[keep]


def curves_svg(labels: np.ndarray, scores: np.ndarray, level: str) -> list[str]:
    """ROC and PR curves as two inline SVGs."""
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    out = []
    for (x, y), (xlabel, ylabel), name in (((fpr, tpr), ("false positive rate", "true positive rate"), "ROC"),
                                           ((recall, precision), ("recall", "precision"), "PR")):
        figure, axis = plt.subplots(figsize=(4, 3.4))
        axis.plot(*_thin(x, y), color="#1f5fbf")
        axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=f"{level} {name}")
        axis.grid(alpha=0.3)
        out.append(_svg(figure))
    return out


def histogram_svg(normal: np.ndarray, defective: np.ndarray, threshold: float, title: str, log: bool) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 3.4))
    bins = np.linspace(min(normal.min(), defective.min()), max(normal.max(), defective.max(), threshold), 40)
    axis.hist(normal, bins=bins, alpha=0.6, color="#2a8f2a", label="normal")
    axis.hist(defective, bins=bins, alpha=0.6, color="#c03030", label="defective")
    axis.axvline(threshold, color="k", linestyle="--", label="threshold")
    axis.set(title=title, xlabel="score", ylabel="count")
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    return _svg(figure)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def thumbnail(image: np.ndarray, values: np.ndarray, truth: np.ndarray, pixel_threshold: float) -> str:
    """Heatmap overlay at model size with ground-truth (green) and predicted-mask (magenta) contours, as a data URI."""
    overlay = (0.55 * image.astype(np.float32) + 0.45 * colourise(values).astype(np.float32)).astype(np.uint8)
    overlay[_outline(values >= pixel_threshold)] = PREDICTED_COLOUR
    overlay[_outline(truth)] = GROUND_TRUTH_COLOUR
    return _data_uri(overlay)


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def generated_section(defects: list | None) -> str:
    """A row of the run's pixel-DAGM samples (`_generator.Defect`), each mask outlined in green."""
    if not defects:
        return ""
    cards = []
    for defect in defects:
        image = defect.image.copy()
        image[_outline(defect.mask)] = GROUND_TRUTH_COLOUR
        cards.append(f'<figure><img alt="generated defect" src="{_data_uri(image)}"><figcaption>tau {defect.tau:.2f}, '
                     f'change {defect.change:.3f}</figcaption></figure>')
    return (f"<h2>Generated defects</h2>\n<p>{len(defects)} samples of the run's generator (DAGM in pixels, "
            f"<code>hdm generate</code>) from held-out normal images; <span style=\"color:#0a0\">green</span>: the "
            f'mask.</p>\n<div class="gallery">{"".join(cards)}</div>\n')


def gallery_order(labels: np.ndarray, scores: np.ndarray, image_threshold: float) -> np.ndarray:
    """Indices sorted worst first: how far each image sits on the wrong side of the threshold (logit units)."""
    margin = (logit(torch.as_tensor(scores, dtype=torch.float64))
              - logit(torch.tensor(image_threshold, dtype=torch.float64))).numpy()
    return np.argsort(-np.where(labels == 1, -margin, margin), kind="stable")


def _outcome(label: int, flagged: bool) -> str:
    return {(1, True): "hit", (1, False): "miss", (0, True): "false_alarm", (0, False): "ok"}[(label, flagged)]


def write_report(path: Path, evaluation: Evaluation, thresholds: tuple[float, float], title: str, image_size: int,
                 gallery_size: int = 48, generated: list | None = None) -> None:
    """The page; `generated`: a row of the run's pixel-DAGM samples (`_generator.Defect`), when it has a generator."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller files
    image_threshold, pixel_threshold = thresholds
    labels, scores, masks, maps = evaluation.labels, evaluation.scores, evaluation.masks, evaluation.maps
    metrics = evaluation.metrics

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in metrics.items()
                   if k in METRIC_KEYS or k.endswith("threshold") or k == "pixel_normal_part_fpr")
    rng = np.random.default_rng(0)
    normal_pixels, defect_pixels = maps[~masks], maps[masks]
    sample = lambda v: v if len(v) <= PIXEL_SAMPLE else rng.choice(v, PIXEL_SAMPLE, replace=False)  # noqa: E731
    plots = [*curves_svg(labels, scores, "image"), *curves_svg(masks.ravel(), maps.ravel(), "pixel"),
             histogram_svg(scores[labels == 0], scores[labels == 1], image_threshold, "image scores", log=False),
             histogram_svg(sample(normal_pixels), sample(defect_pixels), pixel_threshold, "pixel scores", log=True)]

    cards = []
    for index in gallery_order(labels, scores, image_threshold)[:gallery_size]:
        prediction = evaluation.predictions[index]
        image = resize_image(load_image(prediction.sample.path), image_size)
        outcome = _outcome(int(labels[index]), bool(scores[index] >= image_threshold))
        name = html.escape(f"{prediction.sample.defect_type}/{prediction.sample.path.name}")
        cards.append(f'<figure><img alt="{name}" src="{thumbnail(image, maps[index], masks[index], pixel_threshold)}">'
                     f'<figcaption><span class="name" title="{name}">{name}</span>score {scores[index]:.4f} '
                     f'<span class="{outcome}">{outcome.replace("_", " ")}</span></figcaption></figure>')

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(labels)} test images ({int((labels == 1).sum())} defective). Image threshold {image_threshold:.4f},
pixel threshold {pixel_threshold:.4f}, both calibrated on held-out normal images only.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2>Curves and score distributions</h2>
<div class="plots">{"".join(plots)}</div>
<h2>Gallery: worst misses and false alarms first</h2>
<p>Heatmap overlay at model size; <span style="color:#0a0">green</span>: ground truth,
<span style="color:#c0c">magenta</span>: predicted mask. {len(cards)} of {len(labels)} images shown.</p>
<div class="gallery">{"".join(cards)}</div>
{generated_section(generated)}</body></html>
"""
    write_bytes_atomic(path, page.encode())
