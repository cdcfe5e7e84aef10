"""Speed and memory benchmark: model inference (torch and ONNX), the encoder, the anchor, and `hdm predict`.

    .venv/bin/python bench/speed.py [--run RUN] [--repeats 5] [--out bench/results/speed.md]

Inference cost does not depend on the weights, so without --run an untrained HDM with default
settings is timed (its checkpoint is written to a temporary run for the `hdm predict` figures).
All figures are medians over --repeats runs on the MVTec AD bottle test images at 256^2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import torch

from hdm._anchor import NearestNeighbourAnchor
from hdm._config import HDMConfig
from hdm._data import list_images, load_images_resized
from hdm._export import OnnxDetector, export_onnx
from hdm._inference import calibrate
from hdm._model import HDM, to_model_input
from hdm._runtime import keep_freed_memory
from hdm._store import load_model, save_checkpoint
from categories import category_folder
from timing import command_line, measured_run, median_rate

DATA = category_folder("bottle")


def batched(model, images: torch.Tensor, batch_size: int):
    def run():
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    return run


def predict_cli(run: Path, folder: Path, out: Path, keep_memory: bool = True) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `hdm predict` process (without `hdm._runtime.keep_freed_memory`
    when asked, to measure what it gives)."""
    hdm = Path(sys.executable).with_name("hdm")
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HDM_KEEP_FREED_MEMORY": "1" if keep_memory else "0"}
    return measured_run([str(hdm), "predict", "--run", str(run), str(folder), "--out", str(out)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the hdm command does
    if not DATA.is_dir():
        sys.exit(f"bench: {DATA} not found")

    work = Path(tempfile.mkdtemp(prefix="hdm-speed-"))
    model = load_model(args.run / "model.pt")[0] if args.run else HDM(HDMConfig()).eval()
    normal = list_images(DATA / "train" / "good")[:20]
    with torch.no_grad():
        normal_z = model.space(to_model_input(load_images_resized(normal, model.image_size))).z
    if args.run:
        run = args.run
    else:
        # A bank of real cells: onnxruntime folds much of the search away against an all-zero one.
        model.density.fit(normal_z, torch.Generator().manual_seed(0))
        # Thresholds do not change the cost, but predict and export need a calibrated model.
        calibrate(model, normal, model.config.calibration.target_fpr, progress=False)
        run = work / "run"
        save_checkpoint(run / "model.pt", model.config, model.trained_state())
    paths = sorted(p for p in list_images(DATA / "test"))
    images = to_model_input(load_images_resized(paths, model.image_size))
    n = len(images)

    rows = {}
    rows["HDM model, batch 16"] = median_rate(batched(model, images, 16), n, args.repeats)
    rows["HDM model, batch 1"] = median_rate(batched(model, images[:16], 1), 16, args.repeats)
    without_prior = deepcopy(model.config)
    without_prior.pom.density_bank = 0
    rows["HDM model without POM's density prior, batch 16"] = median_rate(
        batched(HDM(without_prior).eval(), images, 16), n, args.repeats)

    def with_prior(**settings) -> HDM:
        """The model with other POM prior settings, its bank drawn from 20 normal images' cells."""
        config = deepcopy(model.config)
        for name, value in settings.items():
            setattr(config.pom, name, value)
        variant = HDM(config).eval()
        variant.density.fit(normal_z, torch.Generator().manual_seed(0))
        return variant

    rows["HDM model, the prior on 2x2 means of z cells (pom.density_pool=2), batch 16"] = median_rate(
        batched(with_prior(density_pool=2), images, 16), n, args.repeats)
    rows["HDM model, its bank searched whole (pom.density_lists=0), batch 16"] = median_rate(
        batched(with_prior(density_lists=0), images, 16), n, args.repeats)
    rows["HDM model, a 4,096-cell bank searched whole (the previous default), batch 16"] = median_rate(
        batched(with_prior(density_bank=4096, density_lists=0), images, 16), n, args.repeats)
    export_onnx(model, work / "model.onnx")
    rows["HDM exported, onnxruntime, batch 16"] = median_rate(batched(OnnxDetector(work / "model.onnx"), images, 16), n, args.repeats)
    rows["frozen encoder alone, batch 16"] = median_rate(batched(model.space, images, 16), n, args.repeats)
    anchor = NearestNeighbourAnchor(model.space).eval()
    anchor.fit(load_images_resized(list_images(DATA / "train" / "good"), model.image_size))
    rows["nearest-neighbour anchor, batch 16"] = median_rate(batched(anchor, images, 16), n, args.repeats)

    # End to end, and memory against the number of images (the same images copied 4x).
    big = work / "many"
    for copy in range(4):
        shutil.copytree(DATA / "test", big / f"copy{copy}")
    small_runs, default_malloc_runs = [], []
    for _ in range(3):  # alternated, so that drift of the machine hits both alike
        small_runs.append(predict_cli(run, DATA / "test", work / "out"))
        default_malloc_runs.append(predict_cli(run, DATA / "test", work / "out", keep_memory=False))
    big_runs = [predict_cli(run, big, work / "out") for _ in range(3)]
    small_s = statistics.median(r[0] for r in small_runs)
    big_s = statistics.median(r[0] for r in big_runs)
    default_s = statistics.median(r[0] for r in default_malloc_runs)
    marginal = 3 * n / (big_s - small_s)
    shutil.rmtree(work, ignore_errors=True)

    hdm_rate = rows["HDM model, batch 16"]
    lines = ["| what | images/s | ratio to HDM batch 16 |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.1f} | {rate / hdm_rate:.2f} |" for name, rate in rows.items()]
    lines += [
        "",
        "| `hdm predict` (decode, model, overlays, masks, scores.csv) | value |",
        "|---|---|",
        f"| {n} images, whole process incl. start-up | {small_s:.1f} s ({n / small_s:.1f} images/s) |",
        f"| {4 * n} images, whole process incl. start-up | {big_s:.1f} s ({4 * n / big_s:.1f} images/s) |",
        f"| steady-state rate (extra {3 * n} images / extra time) | {marginal:.1f} images/s |",
        f"| {n} images with glibc's default malloc thresholds (HDM_KEEP_FREED_MEMORY=0) | "
        f"{default_s:.1f} s ({default_s / small_s:.2f}x the time), peak RSS "
        f"{statistics.median(r[1] for r in default_malloc_runs):.0f} MiB |",
        f"| peak RSS, {n} images | {statistics.median(r[1] for r in small_runs):.0f} MiB |",
        f"| peak RSS, {4 * n} images | {statistics.median(r[1] for r in big_runs):.0f} MiB |",
    ]
    command = command_line()
    text = (f"# Speed on this machine\n\nProduced by `{command}`: medians over {args.repeats} runs "
            f"(3 for `hdm predict`), {torch.get_num_threads()} CPU threads, fp32, 256², MVTec AD bottle test images.\n\n"
            + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
