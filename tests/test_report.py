"""report.html: self-contained, sorted worst first, and rendered by headless Chromium without console errors."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import save
from hdm._data import Sample
from hdm._generator import Defect
from hdm._inference import Evaluation, Prediction
from hdm._metrics import compute_metrics, threshold_metrics
from hdm._report import gallery_order, write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--window-size=1280,2400"]


def render(page, screenshot, profile) -> str:
    """Open `page` in headless Chromium, save a screenshot, return the browser console lines."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    result = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
                             page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def evaluation(tmp_path):
    rng = np.random.default_rng(0)
    size, predictions, masks, maps, labels = 32, [], [], [], []
    for i in range(8):
        label = int(i >= 4)
        # Half the names as long as brain_flair's, which used to run into the next card.
        name = f"TCGA_CS_4941_19960909_slice_{i}.png" if i % 2 else f"{i}.png"
        path = save(tmp_path / "imgs" / name, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mask = np.zeros((size, size), bool)
        if label:
            mask[8:16, 8:20] = True
        values = rng.random((size, size)).astype(np.float32) * 0.3 + 0.5 * mask
        predictions.append(Prediction(Sample(path, label, None, "crack" if label else "good"), values,
                                      float(values.max()), (40, 48)))
        masks.append(mask), maps.append(values), labels.append(label)
    labels, masks, maps = np.array(labels), np.stack(masks), np.stack(maps)
    scores = np.array([p.score for p in predictions])
    metrics = compute_metrics(labels, scores, masks, maps) | threshold_metrics(labels, scores, masks, maps, 0.6, 0.6)
    return Evaluation(metrics, predictions, labels, scores, masks, maps)


def test_report_is_self_contained_and_renders_without_console_errors(evaluation, tmp_path):
    page = tmp_path / "report.html"
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    generated = [Defect(np.full((32, 32, 3), 90 * k, np.uint8), mask, 0, 1.0, 0.1) for k in range(2)]
    write_report(page, evaluation, (0.6, 0.6), "unit report", image_size=32, generated=generated)
    text = page.read_text()
    assert text.count("<svg") == 6  # image ROC/PR, pixel ROC/PR, two histograms
    assert text.count('<img alt="') == 8 + 2 and text.count('alt="generated defect"') == 2
    assert "image_auroc" in text and "image_recall_at_threshold" in text
    # Nothing to fetch: every src/href is inline.
    assert not [ref for ref in re.findall(r'(?:src|href)="([^"]*)"', text) if not ref.startswith(("data:", "#"))]
    shot = tmp_path / "report.png"
    assert render(page, shot, tmp_path / "profile") == []
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # something was drawn, not a blank page


def test_the_console_check_catches_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    lines = render(page, tmp_path / "broken.png", tmp_path / "profile")
    assert any("undefinedFunction" in line for line in lines)


def test_gallery_puts_the_worst_misses_and_false_alarms_first():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.2, 0.9, 0.95, 0.05, 0.4])  # 0.9: false alarm; 0.05 and 0.4: misses
    order = gallery_order(labels, scores, image_threshold=0.5)
    assert list(order[:3]) == [3, 1, 4]  # the farthest on the wrong side of the threshold first


def test_long_names_are_cut_to_the_card_with_the_whole_name_on_hover(evaluation, tmp_path):
    page = tmp_path / "report.html"
    write_report(page, evaluation, (0.6, 0.6), "unit report", image_size=32)
    text = page.read_text()
    captions = re.findall(r'<span class="name" title="([^"]*)">([^<]*)</span>', text)
    assert len(captions) == 8 and all(title == shown for title, shown in captions)
    assert any(title.endswith("TCGA_CS_4941_19960909_slice_5.png") for title, _ in captions)
    rule = re.search(r"\.name \{([^}]*)\}", text).group(1)
    assert "overflow: hidden" in rule and "text-overflow: ellipsis" in rule and "white-space: nowrap" in rule
