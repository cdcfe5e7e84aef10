"""Accuracy benchmark on the real data: HDM vs the nearest-neighbour anchor, plus the ablations.

    .venv/bin/python bench/accuracy.py [--categories C ...] [--ablation [KEY ...]] [--seeds 0 1 ...] [--steps N]
                                       [--set SECTION.KEY=VALUE ...] [--generators DIR] [--out bench/results/accuracy.md]
    .venv/bin/python bench/accuracy.py --merge PART.json ... --out bench/results/accuracy.md

Trains and tests each category at the default settings (256^2, lite0) and writes a Markdown table
naming this command, with a second table per defect type. The anchor uses the same frozen features,
smoothing and top-k score and is measured in every run. With several seeds, full HDM is trained once
per seed (the spread between seeds is the yardstick for any difference in the table; a second table
averages each method over its seeds); the ablations use the first seed. A long bench runs in parts,
each with its own --out; --merge joins their JSON files into one table that names every part's command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdm._anchor import NearestNeighbourAnchor
from hdm._config import GENERATOR_SAMPLING, HDMConfig, resolve
from hdm._data import load_images_resized
from hdm._inference import evaluate
from hdm._layouts import DataSource
from hdm._metrics import METRIC_KEYS, per_group_metrics, per_type_metrics
from hdm._runs import GENERATOR_FILE, fit_generator_run, fit_run, test_run
from hdm._runtime import keep_freed_memory
from hdm._space import FeatureSpace
from hdm._store import load_generator, write_bytes_atomic, write_json
from categories import CATEGORIES, data_root
from timing import command_line

NEW = ("magnetic_tile", "brain_flair")  # the categories no earlier choice was tuned on

# key -> (name, overrides, categories it runs on): every ablation on the two untuned categories,
# plus where an earlier table measured it.
ABLATIONS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "no-density": ("POM without the density prior", {"pom.density_bank": 0}, CATEGORIES),
    "density-pool2": ("POM's prior asked about 2x2 means of z cells (4x less search)", {"pom.density_pool": 2},
                      ("bottle", *NEW)),
    "raw-distance": ("POM's prior as the raw distance to the nearest bank cell (no radius)",
                     {"pom.density_neighbours": 0}, NEW),
    "no-diffusion": ("DAGM without diffusion content", {"dagm.p_diffusion_max": 0.0}, ("metal_plate", *NEW)),
    "tau0": ("tau = 0", {"dagm.tau": 0.0, "pom.adapt_tau": False}, ("metal_plate", *NEW)),
    "no-filtering": ("POM filtering off", {"pom.filtering": False}, ("metal_plate", *NEW)),
    "covered-fraction": ("POM map targets = covered fraction", {"pom.full_cell_coverage": 1.0}, ("metal_plate", *NEW)),
    "cut-appearance": ("DAGM appearance anomalies cut to their mask in z", {"dagm.appearance_spread": False},
                       ("bottle", "metal_plate", *NEW)),
    "no-refinement": ("DDM without the stride-4 refinement", {"ddm.refine": False}, ("bottle", "metal_plate", *NEW)),
    "no-raise-penalty": ("POM without the refinement's raise penalty", {"pom.lambda_refine_raise": 0.0},
                         ("bottle", *NEW)),
    # An addition, not a removal: its rows' train seconds include fitting the generator first.
    "pixel-dagm": ("with pixel-DAGM defects as a quarter of the appearance anomalies", {"dagm.pixel_share": 0.25},
                   CATEGORIES),
    # Not a removal either: the whole method on the image itself, at the largest size a CPU trains in about an hour
    # (image sizes are multiples of 32; 20 steps at 128 px took 131 s here, so 800 would take ~1.5 h).
    "pixel-space": ("HDM in pixel space at 96 px (the paper's setting)", {"space.kind": "pixel", "space.image_size": 96},
                    ("bottle", "metal_plate")),
}


def configured(overrides: dict, assignments: list[str], steps: int | None, seed: int) -> HDMConfig:
    """The defaults with the run's seed and steps, an ablation's overrides, then the bench's --set (as `hdm fit --set`)."""
    values = {"train.seed": seed, **({"train.steps": steps} if steps else {}), **overrides}
    return resolve(values=values, assignments=assignments, where="bench ablation")


def aspect_group(shape: tuple[int, int]) -> str:
    """The test image's own shape, before it is resized to the model's square."""
    aspect = max(shape) / min(shape)
    return "aspect < 1.3" if aspect < 1.3 else "aspect 1.3–1.6" if aspect < 1.6 else "aspect ≥ 1.6"


def detail(evaluation) -> dict:
    """The metrics, per defect type and per image shape."""
    types = [p.sample.defect_type for p in evaluation.predictions]
    shapes = [aspect_group(p.shape) for p in evaluation.predictions]
    scored = (evaluation.labels, evaluation.scores, evaluation.masks, evaluation.maps)
    return {**evaluation.metrics, "per_type": per_type_metrics(types, *scored),
            "per_shape": per_group_metrics(shapes, *scored)}


def run_anchor(root: Path, category: str, config: HDMConfig) -> dict:
    started = time.perf_counter()
    anchor = NearestNeighbourAnchor(FeatureSpace(config.space), config.ddm.smooth_sigma, config.ddm.top_k,
                                    seed=config.train.seed).eval()
    source = DataSource.detect(root, category)
    anchor.fit(load_images_resized([s.path for s in source.train_samples()], config.space.image_size))
    evaluation = evaluate(anchor, source.test_samples(), progress=False)
    return {**detail(evaluation), "train_seconds": 0.0, "total_seconds": time.perf_counter() - started}


def earlier_generator(generators: Path | None, category: str, config: HDMConfig) -> tuple[Path, float] | None:
    """generators/<category>/generator.pt and its fit's seconds if it was fitted at this run's settings and
    seed (the hold-out split is checked again when the fit loads it; the fit draws from it with its own
    sampling settings), else None."""
    path = None if generators is None else generators / category / GENERATOR_FILE
    if path is None or not path.is_file():
        return None
    generator, extra = load_generator(path)
    stored = generator.config
    learned = lambda g: {k: v for k, v in vars(g).items() if k not in GENERATOR_SAMPLING}  # noqa: E731
    same = (all(getattr(stored, part) == getattr(config, part) for part in ("space", "diffusion", "calibration"))
            and learned(stored.generator) == learned(config.generator))
    return (path, extra["training"]["train_seconds"]) if same and stored.train.seed == config.train.seed else None


def run_hdm(root: Path, category: str, config: HDMConfig, generators: Path | None = None) -> dict:
    """`hdm fit` + `hdm test` (the same functions, into a scratch run folder): train on 90% of the normal
    images, calibrate on the rest, evaluate at the calibrated thresholds; `hdm fit-generator` first when
    DAGM draws on the pixel generator, unless `generators`/<category> holds one fitted on this run's
    images at its settings (bench/realism.py's are, for seed 0): its fit time is then its own log's."""
    source, log = DataSource.detect(root, category), (lambda m: print(m, file=sys.stderr))
    generator_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="hdm-bench-") as folder:
        if config.dagm.pixel_share > 0:  # `hdm fit-generator` into the run, then `hdm fit`
            earlier = earlier_generator(generators, category, config)
            if earlier is not None:
                shutil.copy(earlier[0], Path(folder) / GENERATOR_FILE)
                generator_seconds = earlier[1]
            else:
                started = time.perf_counter()
                fit_generator_run(Path(folder), source, config, log=log, progress=False)
                generator_seconds = time.perf_counter() - started
        run = fit_run(config, source, Path(folder), log=log, progress=False)
        evaluation = test_run(run.path, progress=False, report=False)
    summary = run.training.summary()
    return {**detail(evaluation), "train_seconds": run.training.seconds + generator_seconds,
            "generator_seconds": generator_seconds, "tau_final": summary["tau"],
            "rejected_fraction": summary["rejected_fraction"], "holdout_images": len(run.holdout)}


def table(rows: list[dict]) -> str:
    """Metrics, then what the calibrated threshold does on the test set (HDM rows only: the anchor has none)."""
    head = ("| category | method | seed | " + " | ".join(METRIC_KEYS)
            + " | recall at threshold | false alarms at threshold | train s |")
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 6)]
    for r in rows:
        at = lambda k: f"{r[k]:.3f}" if k in r else "–"  # noqa: E731
        lines.append(f"| {r['category']} | {r['method']} | {r.get('seed', '–')} | " + " | ".join(f"{r[k]:.4f}" for k in METRIC_KEYS)
                     + f" | {at('image_recall_at_threshold')} | {at('image_fpr_at_threshold')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str:
    """Each method's metrics averaged over its seeds, where it has two or more (a seed measured in two
    parts counts once: the later part's row), so that a difference is read against the spread of seeds."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if "seed" in r:
            groups.setdefault((r["category"], r["method"]), {})[r["seed"]] = r
    lines = ["| category | method | seeds | " + " | ".join(METRIC_KEYS) + " |", "|" + "---|" * (len(METRIC_KEYS) + 3)]
    for (category, method), seeds in groups.items():
        if len(seeds) > 1:
            means = [sum(r[k] for r in seeds.values()) / len(seeds) for k in METRIC_KEYS]
            lines.append(f"| {category} | {method} | {', '.join(map(str, sorted(seeds)))} | "
                         + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines) if len(lines) > 2 else "No method was measured at more than one seed."


def type_table(rows: list[dict]) -> str:
    """Image AUROC / pixel AUROC / AUPRO per defect type (each type against all normal test images)."""
    lines = ["| category | defect type (images) | method | seed | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind, m in r["per_type"].items():
            cells = " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))
            lines.append(f"| {r['category']} | {kind} ({m['images']}) | {r['method']} | {r.get('seed', '–')} | {cells} |")
    return "\n".join(lines)


def shape_table(rows: list[dict]) -> str:
    """The same metrics within each group of test images of one aspect ratio (its own normal and
    defective images), for the categories whose images are not all of one shape."""
    lines = ["| category | test images (defective) | method | seed | image AUROC | pixel AUROC | AUPRO |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if len(r.get("per_shape", {})) < 2:
            continue
        for group, m in r["per_shape"].items():
            cells = " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))
            lines.append(f"| {r['category']} | {group}: {m['images']} ({m['defective']}) | {r['method']} | "
                         f"{r.get('seed', '–')} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else "No category has test images of more than one aspect group."


def by_category(rows: list[dict]) -> list[dict]:
    """Rows in CATEGORIES' order; stable, so each part's order is kept within a category."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(rows, key=lambda r: order[r["category"]])


def save_part(out: Path, text: str, commands: list[str], rows: list[dict]) -> None:
    """A bench's table, and beside it the JSON that `read_parts` joins with other parts' into one table."""
    write_bytes_atomic(out, text.encode())
    write_json(out.with_suffix(".json"), {"commands": commands, "rows": rows})


def read_parts(paths: list[Path]) -> tuple[list[str], list[dict]]:
    """The commands and rows of parts written by `save_part`, in the order given."""
    parts = [json.loads(path.read_text()) for path in paths]
    return [c for part in parts for c in part["commands"]], [r for part in parts for r in part["rows"]]


def write(out: Path, commands: list[str], rows: list[dict], quiet: bool = False) -> None:
    made_by = " and ".join(f"`{c}`" for c in commands)
    rows = by_category(rows)
    text = (f"# Accuracy on the real data\n\nProduced by {made_by} (256², lite0, {torch.get_num_threads()} CPU threads).\n\n"
            f"HDM trains on 90% of the normal training images and calibrates its thresholds on the other 10% "
            f"(target false-alarm rate {HDMConfig().calibration.target_fpr}); the columns 'at threshold' are "
            f"image-level recall on defective and false-alarm rate on normal test images at that threshold. "
            f"Each part measures the anchor again beside its own HDM rows.\n\n"
            f"{table(rows)}\n\n## Mean over seeds\n\n{seed_table(rows)}\n\n## Per defect type\n\n{type_table(rows)}\n\n"
            f"## Per image shape\n\nTest images grouped by their own aspect ratio (long side / short side) before "
            f"they are resized to the model's square.\n\n{shape_table(rows)}\n")
    save_part(out, text, commands, rows)
    print(json.dumps(rows[-1]) if quiet else text, file=sys.stderr if quiet else sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--ablation", nargs="*", choices=list(ABLATIONS), metavar="KEY",
                        help="ablation rows: all, or only the KEYs named (" + ", ".join(ABLATIONS)
                        + "; see ABLATIONS for which category each runs on)")
    parser.add_argument("--ablation-only", action="store_true", help="no full-HDM rows (a part of a longer bench)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="an override applied to every HDM row, as `hdm fit --set` (named in the table's command)")
    parser.add_argument("--generators", type=Path, metavar="DIR",
                        help="pixel-dagm rows: reuse DIR/<category>/generator.pt where it was fitted at the row's "
                             "settings and seed (bench/realism.py's --runs), instead of fitting one")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PART.json", help="join bench parts into one table")
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.merge:
        write(args.out, *read_parts(args.merge))
        return
    keep_freed_memory()  # as the hdm command does

    try:
        configured({}, args.set, args.steps, args.seeds[0])
    except ValueError as exc:
        sys.exit(f"bench: {exc}")
    command = command_line()
    rows = []
    for category in args.categories:
        root = data_root(category)
        runs = [] if args.ablation_only else [("HDM (full)", {}, seed) for seed in args.seeds]
        if args.ablation is not None:
            runs += [(name, extra, args.seeds[0]) for key, (name, extra, categories) in ABLATIONS.items()
                     if category in categories and (not args.ablation or key in args.ablation)]
        anchor = run_anchor(root, category, configured({}, [], args.steps, args.seeds[0]))
        rows.append({"category": category, "method": "nearest-neighbour anchor", "seed": args.seeds[0], **anchor})
        for name, config_overrides, seed in runs:
            result = run_hdm(root, category, configured(config_overrides, args.set, args.steps, seed), args.generators)
            rows.append({"category": category, "method": name, "seed": seed, **result})
            # Written after every row: a long part that is stopped keeps the rows it finished.
            write(args.out, [command], rows, quiet=True)
    write(args.out, [command], rows)


if __name__ == "__main__":
    main()
