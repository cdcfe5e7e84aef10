"""How the bank of POM's density prior moves the prior alone: its size, its search and its draw (the coreset's seed).

    .venv/bin/hdm fit --data ROOT --category C --steps 400 --out RUN          # any run: only its space is used
    .venv/bin/python bench/bank.py --runs RUN ... [--sizes 4096 20000 20000/128x4] [--draws 3] [--out FILE]

A size is SIZE (searched whole) or SIZE/LISTSxPROBE (split into LISTS lists by k-means, each cell compared
with its PROBE nearest lists: pom.density_lists and pom.density_probe); 'exact hits' is the share of
test cells whose nearest bank cell that search found, against a search of the whole bank.

For each run: the same test sample as bench/voices.py and the run's own calibration hold-out. The bank
is drawn again from the run's training split (90% of the normal images) for each size and draw, the
prior's voice measured in units of its held-out normal scale and mapped to probabilities through the
head's held-out scale, as `NormalDensity.fuse` does, then smoothed and scored like the model's map.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from voices import collect, map_metrics, test_subset, units

from hdm._data import Sample, load_images_resized
from hdm._layouts import DataSource
from hdm._pom import NormalDensity, prior_voice
from hdm._runs import split_data
from hdm._store import load_model
from hdm._train import encode
from timing import command_line


def measure(run: Path, banks: list[str], draws: int, per_class: int) -> list[dict]:
    model, extra = load_model(run / "model.pt")
    if model.density is None:
        raise SystemExit(f"bench: {run} has no density prior (pom.density_bank = 0)")
    space, head = model.space, model.density
    source = DataSource.from_dict(extra["source"])
    train, holdout, _ = split_data(model.config, source)
    normal = space.normalise(encode(space, load_images_resized(train, model.image_size), progress=False)).z
    def z_of(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": space(images).z}

    held = collect(model, [Sample(p, 0) for p in holdout], z_of)["z"]
    truth = collect(model, test_subset(source, per_class), z_of)
    test = truth["z"]
    rows = []
    for bank in banks:
        size, lists, probe = parse_bank(bank)
        for draw in range(draws):
            density = NormalDensity(space.channels, size, lift=space.lift, lifted=space.lifted_channels, lists=lists,
                                    probe=probe)
            density.fit(normal, torch.Generator().manual_seed(draw))
            with torch.no_grad():
                held_prior = torch.cat([density(z, 64) for z in held.split(16)])
                start = time.perf_counter()
                found = torch.cat([density.distance(z) for z in test.split(16)])
                search_ms = 1000 * (time.perf_counter() - start) / len(test)
                density.probe = 0
                nearest = torch.cat([density.distance(z) for z in test.split(16)])
            prior = prior_voice(found, 64)
            metrics = map_metrics(model, head.head_loc + (head.head_top - head.head_loc) * units(prior, held_prior),
                                  truth)
            hits = float((found <= nearest * (1 + 1e-5) + 1e-5).float().mean())
            rows.append({"run": run.name, "bank": bank, "draw": draw, "search_ms": search_ms, "hits": hits, **metrics})
            print(f"{run.name} bank {bank} draw {draw}: {metrics['image_auroc']:.4f} / {metrics['pixel_auroc']:.4f} / "
                  f"{metrics['pixel_aupro']:.4f}, exact hits {hits:.3f}, {search_ms:.1f} ms/image", flush=True)
    return rows


def parse_bank(bank: str) -> tuple[int, int, int]:
    """'SIZE' or 'SIZE/LISTSxPROBE' -> (size, lists, probe); lists = 0 searches the whole bank."""
    size, _, search = bank.partition("/")
    lists, _, probe = search.partition("x")
    return int(size), int(lists or 0), int(probe or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--sizes", nargs="+", default=["4096", "20000"],
                        help="bank sizes, each searched whole or, as SIZE/LISTSxPROBE, through an inverted file")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bank.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = command_line()
    rows = [row for run in args.runs for row in measure(run, args.sizes, args.draws, args.per_class)]
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro")
    lines = [f"# The prior alone against its bank's size, search and draw\n\nProduced by `{command}` (test sample as "
             f"in bench/voices.py; search time per test image, 2 CPU threads).\n",
             "| run | bank | draw | image AUROC | pixel AUROC | AUPRO | exact hits | search ms/image |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['bank']} | {r['draw']} | " + " | ".join(f"{r[k]:.4f}" for k in keys)
              + f" | {r['hits']:.3f} | {r['search_ms']:.1f} |" for r in rows]
    lines += ["", "| run | bank | median over draws (range) image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for run in args.runs:
        for bank in args.sizes:
            group = [r for r in rows if r["run"] == run.name and r["bank"] == bank]
            cells = [f"{statistics.median(r[k] for r in group):.4f} ({max(r[k] for r in group) - min(r[k] for r in group):.4f})"
                     for k in keys]
            lines.append(f"| {run.name} | {bank} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
