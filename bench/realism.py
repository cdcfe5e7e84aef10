"""How real DAGM's pixel defects look, measured against the real test defects and against the pasted
appearance anomalies DAGM used before (shuffled patches, foreign textures, stains, brightness changes).

    .venv/bin/python bench/realism.py [--root ../shared/datasets] [--categories bottle,...] [--samples 100]
                                      [--runs runs/realism] [--masks blobs|real] [--set generator.NAME=VALUE ...]
                                      [--out bench/results/realism.md]

Per category: a generator is fitted with the default settings (`hdm fit-generator`, timed) into
RUNS/<category> unless one is there. Then four sets of masked regions:
- real: every defective test image with its ground-truth mask;
- generated: --samples defects from the generator at the default settings (`make_defects`: the
  training normals in turn, blob masks on the part, POM's band). With --masks real, each normal gets one
  of the real defects' own masks instead (shuffled, in turn), so that the masks' size, shape and place
  match the real regions' and only the content inside them differs;
- paste: today's appearance anomalies (`appearance_anomaly`) on the same normals inside the same masks,
  so that only the content differs;
- normal: the same normals and masks untouched, the distance a region has when nothing is changed.
A region's descriptor is the mean, over the stride-8 cells its mask covers at least half (the most
covered one if none), of the frozen Lite0 features hdm's feature space computes (z, standardised per
channel over the training normals). No Inception network exists offline, so these replace it.
KID: the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, mean and spread
over 100 random subsets of min(n, 50) per set; the real row compares two disjoint halves of the real
regions (the floor). Generated and paste are compared paired: on each subset both are scored against the
same real regions, with the same masks and starts, and the difference's mean, spread and the share of
subsets where generated is closer are reported (the spread of each KID alone is mostly the draw of real
regions, which both share). Diversity: the mean pairwise distance within a set; generated against paste
also per subset of the same samples, as a relative difference.
Goal (issue 19): generated closer to real than paste on every category, at no less diversity.
Each category's contact sheet (source | mask | generated, the first 12) goes to RUNS/<category>/contact_sheet.png
(contact_sheet-real-masks.png with --masks real).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hdm._config import HDMConfig, resolve
from hdm._dagm import appearance_anomaly, foreign_textures, is_grayscale
from hdm._data import iter_batches, load_images_resized, sample_mask
from hdm._generate import contact_sheet
from hdm._generator import make_defects, with_sampling
from hdm._layouts import DataSource
from hdm._runs import GENERATOR_FILE, fit_generator_run, split_data
from hdm._space import FeatureSpace
from hdm._store import load_generator, write_png
from hdm._train import encode
from categories import CATEGORIES, DATASETS, category_folder, category_root
from timing import command_line

SUBSETS, SUBSET_SIZE = 100, 50


def descriptors(space: FeatureSpace, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """N x C: each image's standardised z averaged over the cells its mask covers (see the module's text)."""
    z = space.normalise(encode(space, images, progress=False)).z
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], z.shape[-1])[:, 0]
    weights = (cover >= 0.5).float()
    empty = weights.flatten(1).sum(1) == 0
    if empty.any():
        best = cover[empty].flatten(1).argmax(1)
        weights[empty] = torch.nn.functional.one_hot(best, cover[0].numel()).float().view(-1, *cover.shape[1:])
    pooled = (z * weights[:, None]).flatten(2).sum(2) / weights.flatten(1).sum(1, keepdim=True)
    return pooled.double().numpy()


def mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased squared MMD between two samples of one size with the cubic polynomial kernel."""
    d, off = a.shape[1], ~np.eye(len(a), dtype=bool)
    kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    return float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())


def kid(real: np.ndarray, aligned: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """KID of each aligned set (one row per sample, the k-th rows of all sets made from one mask and start)
    against `real`, per subset: every set is scored on the same draw of real regions and the same samples,
    so a difference between two sets is measured without the spread the draw adds to both. "real": two
    disjoint halves of `real` (the floor)."""
    n = len(next(iter(aligned.values())))
    m, half = min(len(real), n, SUBSET_SIZE), min(len(real) // 2, SUBSET_SIZE)
    values: dict[str, list[float]] = {"real": [], **{name: [] for name in aligned}}
    for _ in range(SUBSETS):
        pick = rng.permutation(len(real))
        values["real"].append(mmd2(real[pick[:half]], real[pick[half:2 * half]]))
        rows, samples = real[rng.choice(len(real), m, replace=False)], rng.choice(n, m, replace=False)
        for name, x in aligned.items():
            values[name].append(mmd2(x[samples], rows))
    return {name: np.asarray(v) for name, v in values.items()}


def distances(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def diversity(x: np.ndarray) -> float:
    return float(distances(x)[~np.eye(len(x), dtype=bool)].mean())


def diversity_gap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per subset of aligned samples (the same rows of both), a's diversity relative to b's, minus one."""
    da, db = distances(a), distances(b)
    m = min(len(a), SUBSET_SIZE)
    off = ~np.eye(m, dtype=bool)
    gaps = []
    for _ in range(SUBSETS):
        rows = rng.choice(len(a), m, replace=False)
        gaps.append(da[np.ix_(rows, rows)][off].mean() / db[np.ix_(rows, rows)][off].mean() - 1)
    return np.asarray(gaps)


def real_regions(source: DataSource, size: int) -> tuple[np.ndarray, np.ndarray]:
    samples = [s for s in source.test_samples() if s.label == 1]
    images, masks = [], []
    for batch in iter_batches(samples, size, 16):
        images.append(batch.images)
        masks += [sample_mask(s, shape, size) for s, shape in zip(batch.samples, batch.shapes)]
    keep = [i for i, m in enumerate(masks) if m.any()]  # a defective image without a mask has no region
    return np.concatenate(images)[keep], np.stack(masks)[keep]


def category_rows(root: Path, category: str, runs: Path, samples: int, config: HDMConfig, with_real_masks: bool) -> dict:
    source = DataSource.detect(category_root(category, root), category)
    run = runs / category
    fitted = None
    if not (run / GENERATOR_FILE).exists():
        started = time.perf_counter()
        fit_generator_run(run, source, config, log=lambda m: print(m, file=sys.stderr), progress=False)
        fitted = time.perf_counter() - started
    generator, extra = load_generator(run / GENERATOR_FILE)
    generator = with_sampling(generator, config.generator)  # one fitted earlier draws at this bench's settings
    train = split_data(config, source)[0]
    normals = load_images_resized(train, config.space.image_size)
    real_images, real_masks = real_regions(source, config.space.image_size)
    given = None
    if with_real_masks:
        order = np.random.default_rng(0).permutation(len(real_masks))
        given = real_masks[order[np.arange(len(normals)) % len(order)]]
    started = time.perf_counter()
    defects, rejected = make_defects(generator, normals, samples, seed=0, masks=given, progress=False)
    generate_seconds = time.perf_counter() - started
    # Made from the data, so written beside the generator and never committed (the data's licences).
    write_png(run / f"contact_sheet{'-real-masks' if with_real_masks else ''}.png", contact_sheet(normals, defects))
    masks = np.stack([d.mask for d in defects])
    starts = normals[[d.source for d in defects]]
    rng = np.random.default_rng(0)
    textures, grey = foreign_textures(config.space.image_size), is_grayscale(normals)
    pasted = np.stack([appearance_anomaly(image, normals[int(rng.integers(len(normals)))], textures, rng, config.dagm,
                                          grey, mask)[0] for image, mask in zip(starts, masks)])

    space = FeatureSpace(config.space).eval()
    space.fit_statistics(encode(space, normals, progress=False))
    real = descriptors(space, real_images, real_masks)
    aligned = {"generated": descriptors(space, np.stack([d.image for d in defects]), masks),
               "paste": descriptors(space, pasted, masks),
               "normal": descriptors(space, starts, masks)}
    scores = kid(real, aligned, np.random.default_rng(0))
    area = {"real": float(np.median(real_masks.mean((1, 2)))), **dict.fromkeys(aligned, float(np.median(masks.mean((1, 2)))))}
    rows = {name: {"n": len(x), "kid": (float(scores[name].mean()), float(scores[name].std())), "diversity": diversity(x),
                   "area": area[name]} for name, x in {"real": real, **aligned}.items()}
    gap = scores["generated"] - scores["paste"]
    rows["generated"]["minus_paste"] = (float(gap.mean()), float(gap.std()), float((gap < 0).mean()))
    spread = diversity_gap(aligned["generated"], aligned["paste"], np.random.default_rng(0))
    rows["generated"]["diversity_vs_paste"] = (float(spread.mean()), float(spread.std()), float((spread >= 0).mean()))
    return {"rows": rows, "rejected": rejected, "generate_seconds_per_sample": generate_seconds / len(defects),
            "generate_seconds_per_draw": generate_seconds / (len(defects) + rejected),
            "fit_seconds": fitted if fitted is not None else extra["training"]["train_seconds"],
            "fit_timed_here": fitted is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DATASETS)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--runs", type=Path, default=Path("runs/realism"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/realism.md"))
    parser.add_argument("--masks", choices=("blobs", "real"), default="blobs",
                        help="the generated and pasted regions' masks: DAGM's default blobs, or the real defects' own")
    parser.add_argument("--set", action="append", default=[], metavar="generator.NAME=VALUE",
                        help="a sampling setting other than the default (as `hdm generate`'s run would hold it)")
    args = parser.parse_args()
    try:
        config = resolve(assignments=args.set, where="bench/realism.py --set")
    except ValueError as exc:
        sys.exit(f"bench: {exc}")
    command = command_line()
    lines = [f"# Realism of DAGM's pixel defects\n\nProduced by `{command}` (2 CPU cores). KID x 1000 against the "
             f"real test defects (lower is closer; mean ± spread over {SUBSETS} subsets; the real row: two disjoint halves of it, the floor), diversity = mean pairwise "
             f"distance (standardised Lite0 features of the masked regions; see bench/realism.py), area = the masks' "
             f"median share of the image.\n",
             "| category | set | regions | area % | KID x 1000 | diversity |", "|---|---|---|---|---|---|"]
    notes = []
    for category in args.categories.split(","):
        if not category_folder(category, args.root).is_dir():
            notes.append(f"- {category}: skipped, no data at {category_folder(category, args.root)}")
            continue
        result = category_rows(args.root, category, args.runs, args.samples, config, args.masks == "real")
        for name, row in result["rows"].items():
            lines.append(f"| {category} | {name} | {row['n']} | {100 * row['area']:.2f} "
                         f"| {1000 * row['kid'][0]:.2f} ± {1000 * row['kid'][1]:.2f} "
                         f"| {row['diversity']:.2f} |")
        rows = result["rows"]
        gap, spread, share = rows["generated"]["minus_paste"]
        closer = gap < 0
        diverse = rows["generated"]["diversity"] >= rows["paste"]["diversity"]
        vs = rows["generated"]["diversity_vs_paste"]
        notes.append(f"- {category}: generated {'closer to' if closer else 'farther from'} real than paste "
                     f"(paired KID x 1000 difference {1000 * gap:+.2f} ± {1000 * spread:.2f}, closer on {100 * share:.0f}% of "
                     f"the subsets), {'at no less' if diverse else 'at less'} diversity (paired, by subset: "
                     f"{100 * vs[0]:+.1f} ± {100 * vs[1]:.1f} %, no less on {100 * vs[2]:.0f}%); generator fitted in "
                     f"{result['fit_seconds']:.0f} s{'' if result['fit_timed_here'] else ' (its own log: fitted earlier)'}, "
                     f"{result['generate_seconds_per_sample']:.2f} s per accepted sample "
                     f"({result['generate_seconds_per_draw']:.2f} s per draw), {result['rejected']} draws rejected by POM")
        print("\n".join(lines[-len(result["rows"]):] + notes[-1:]), file=sys.stderr)
    text = "\n".join(lines + ["", *notes, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
