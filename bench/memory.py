"""Memory of a fit: `hdm fit`'s peak RSS per category, and that of another commit measured in the same run.

    .venv/bin/python bench/memory.py [--categories C ...] [--steps 20] [--repeats 1] [--against REV]
                                     [--out bench/results/memory.md]

A fit's peak comes while it caches (every training image and its DAGM appearance anomalies, encoded
once before the first step); training adds little to it and nothing per step, so --steps (train.steps)
shortens the runs without moving the peak. With --against, the same fits also run from REV's source (a
git worktree made for the run and removed after it), alternated with this tree's, and the table gives
the ratio. Figures are medians over --repeats fits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from categories import CATEGORIES, data_root
from hdm._layouts import DataSource
from timing import command_line, measured_run

HERE = Path(__file__).resolve().parents[1]


def fit_peak(src: Path, root: Path, category: str, steps: int, work: Path) -> float:
    """Peak RSS in MiB of one `hdm fit` from the package in `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return measured_run([sys.executable, "-m", "hdm", "fit", "--data", str(root), "--category",
                         category, "--out", str(work / category), "--steps", str(steps), "--overwrite", "--quiet"],
                        env)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--against", metavar="REV", help="a commit whose fits are measured beside this tree's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.md"))
    args = parser.parse_args()
    roots = {c: data_root(c) for c in args.categories}

    with tempfile.TemporaryDirectory(prefix="hdm-memory-") as scratch:
        work = Path(scratch)
        sources = {"this tree": HERE / "src"}
        if args.against:
            subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(work / "against"),
                            args.against], check=True, capture_output=True)
            sources[args.against] = work / "against" / "src"
        peaks: dict[str, dict[str, list[float]]] = {c: {name: [] for name in sources} for c in args.categories}
        try:
            for category in args.categories:
                for _ in range(args.repeats):
                    for name, src in sources.items():
                        peak = fit_peak(src, roots[category], category, args.steps, work / "runs")
                        peaks[category][name].append(peak)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(work / "against")],
                               check=True, capture_output=True)

    names = list(sources)
    header = "| category | training images | " + " | ".join(f"peak RSS MiB, {n}" for n in names)
    header += " | ratio |" if args.against else " |"
    lines = [header, "|---" * (2 + len(names) + bool(args.against)) + "|"]
    for category, runs in peaks.items():
        by_source = {name: statistics.median(values) for name, values in runs.items()}
        count = len(DataSource.detect(roots[category], category).train_samples())
        row = f"| {category} | {count} | " + " | ".join(f"{by_source[n]:.0f}" for n in names)
        row += f" | {by_source[names[0]] / by_source[names[1]]:.2f} |" if args.against else " |"
        lines.append(row)
    command = command_line()
    text = (f"# Memory of a fit\n\nProduced by `{command}`: `hdm fit` at the defaults with train.steps="
            f"{args.steps} (the peak is in the cache, made before the first step), whole process, median over "
            f"{args.repeats} fit(s); 'training images' counts the category's normal training images before the "
            f"calibration hold-out.\n\n" + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
