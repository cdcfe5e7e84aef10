"""How HDM's two voices (DDM's head, POM's density prior) and rules for fusing them score, per run.

    .venv/bin/hdm fit --data ROOT --category C --steps 400 --out RUN      # one run per category
    .venv/bin/python bench/voices.py --runs RUN ... [--per-class 150] [--out bench/results/voices.md]

For each run: a seeded sample of its test set (up to --per-class normal and as many defective images)
and its own calibration hold-out. Each voice is measured from its median in units of (mean per-image
maximum - median) on the hold-out, as `NormalDensity.fuse` does; the rules then map the fused units
back to the head's logits, so every row goes through the same sigmoid, smoothing and top-k score.
Rows: each voice alone, the model's rule (max), the mean of the two voices, and three rules that
let the head raise the map only where the prior agrees.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hdm._data import Sample, iter_batches, sample_mask
from hdm._layouts import DataSource
from hdm._metrics import compute_metrics
from hdm._model import to_model_input
from hdm._pom import normal_scale
from hdm._runs import split_data
from hdm._store import load_model
from timing import command_line

RULES = {
    "head alone": lambda head, prior: head,
    "prior alone": lambda head, prior: prior,
    "max (the model's rule)": torch.maximum,
    "mean": lambda head, prior: (head + prior) / 2,
    # Rules that let the head speak only with the prior's consent (tried for brain_flair, where the head
    # is loud on normal anatomy): the head capped half a unit above the prior, the head only where the
    # prior is above its normal median, and the geometric mean of the two where both are above it.
    "max, head capped at prior + 0.5": lambda head, prior: torch.maximum(prior, torch.minimum(head, prior + 0.5)),
    "max, head only where prior > median": lambda head, prior: torch.maximum(prior, head * (prior > 0)),
    "max(prior, geometric mean)": lambda head, prior: torch.maximum(prior, (head.relu() * prior.relu()).sqrt()),
}


@torch.no_grad()
def collect(model, samples: list[Sample], outputs: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict:
    """`outputs` of each batch of `samples` (model-size images in [0, 1]), concatenated, with the samples'
    masks at model size and their labels."""
    parts: dict[str, list[torch.Tensor]] = {}
    masks, labels = [], []
    for batch in iter_batches(samples, model.image_size, 16):
        if any(batch.errors):
            raise SystemExit(f"bench: {next(e for e in batch.errors if e)}")
        for key, value in outputs(to_model_input(batch.images)).items():
            parts.setdefault(key, []).append(value)
        masks += [sample_mask(sample, shape, model.image_size) for sample, shape in zip(batch.samples, batch.shapes)]
        labels += [sample.label for sample in batch.samples]
    return {**{key: torch.cat(values) for key, values in parts.items()}, "masks": np.stack(masks),
            "labels": np.array(labels)}


def voices(model, samples: list[Sample]) -> dict:
    return collect(model, samples, lambda images: dict(zip(("head", "prior"), model.voices(images))))


def map_metrics(model, logits: torch.Tensor, truth: dict) -> dict[str, float]:
    """Metrics of logits in the head's units made into the model's map: sigmoid, pixels, smoothing, top-k score."""
    maps, scores = model.ddm.postprocess(model.space.to_pixels(torch.sigmoid(logits)))
    return compute_metrics(truth["labels"], scores.numpy(), truth["masks"], maps[:, 0].numpy())


def units(values: torch.Tensor, held_out: torch.Tensor) -> torch.Tensor:
    loc, top = normal_scale(held_out)
    return (values - loc) / (top - loc)


def test_subset(source: DataSource, per_class: int) -> list[Sample]:
    """A seeded sample of the test set: up to `per_class` normal and as many defective images."""
    rng = np.random.default_rng(0)
    test, chosen = source.test_samples(), []
    for label in (0, 1):
        group = [s for s in test if s.label == label]
        chosen += [group[i] for i in sorted(rng.choice(len(group), min(per_class, len(group)), replace=False))]
    return chosen


def measure(run: Path, per_class: int) -> list[dict]:
    model, extra = load_model(run / "model.pt")
    if model.density is None:
        raise SystemExit(f"bench: {run} has no density prior (pom.density_bank = 0)")
    source = DataSource.from_dict(extra["source"])
    chosen = test_subset(source, per_class)
    _, holdout, _ = split_data(model.config, source)
    test_voices, held_out = voices(model, chosen), voices(model, [Sample(p, 0) for p in holdout])
    head, prior = (units(test_voices[k], held_out[k]) for k in ("head", "prior"))
    loc, top = normal_scale(held_out["head"])
    rows = []
    for name, rule in RULES.items():
        metrics = map_metrics(model, loc + (top - loc) * rule(head, prior), test_voices)
        rows.append({"run": run.name, "category": source.category or "–", "rule": name, "test_images": len(chosen),
                     "holdout_images": len(holdout), **metrics})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench/results/voices.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = command_line()
    rows = [row for run in args.runs for row in measure(run, args.per_class)]
    lines = [f"# HDM's voices and their fusion\n\nProduced by `{command}` from runs made by `hdm fit` (their "
             f"`train_log.json` holds the settings).\n",
             "| run | category | test images | hold-out images | rule | image AUROC | pixel AUROC | AUPRO |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['category']} | {r['test_images']} | {r['holdout_images']} | {r['rule']} | "
              f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pixel_aupro']:.4f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
