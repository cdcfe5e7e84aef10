"""The model's speed in this tree against another tree's (an earlier commit), measured in turns in one run.

    git worktree add /tmp/base REV --detach
    .venv/bin/python bench/against.py --base /tmp/base [--pairs 8] [--out bench/results/against.md]

Each turn times, in a fresh process per tree, an untrained HDM with default settings (a bank of
random cells: inference cost does not depend on the weights) on 16 random 256^2 images, the median of
10 forward passes after 3 warm-up passes. The trees take turns so that a drift in the machine's speed
falls on both; the figure is the median rate of each tree and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from timing import command_line

HERE = Path(__file__).resolve().parents[1]
TIMING = """
import time, torch
try:
    from hdm._config import HDMConfig
    from hdm._model import HDM
except ImportError:  # trees from before the modules were private by name
    from hdm.config import HDMConfig
    from hdm.model import HDM
torch.set_num_threads(2)
torch.manual_seed(0)
model = HDM(HDMConfig()).eval()
if model.density is not None:
    cells = model.space.grid ** 2
    images = -(-model.density.bank.shape[0] // cells)
    model.density.fit(torch.randn(images, model.space.channels, model.space.grid, model.space.grid),
                      torch.Generator().manual_seed(0))
x = torch.rand(16, 3, 256, 256)
with torch.inference_mode():
    for _ in range(3):
        model(x)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
print(16 / sorted(times)[5])
"""


def rate(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, "-c", TIMING], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the other tree (a worktree of an earlier commit)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/against.md"))
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"this tree": [], "base": []}
    for turn in range(args.pairs):
        for name, tree in (("this tree", HERE), ("base", args.base.resolve())):
            rates[name].append(rate(tree))
            print(f"turn {turn + 1}: {name} {rates[name][-1]:.1f} images/s", flush=True)

    def head(tree: Path) -> str:
        return subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()[:90]

    this, base = statistics.median(rates["this tree"]), statistics.median(rates["base"])
    command = command_line()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"# Model speed against an earlier commit\n\nProduced by `{command}`: {args.pairs} turns, each tree in a fresh "
        f"process per turn, HDM batch 16 at 256², 2 CPU threads, fp32; medians over the turns.\n\n"
        f"| tree | commit | images/s (median) | every turn |\n|---|---|---|---|\n"
        f"| this tree | {head(HERE)} | {this:.1f} | {', '.join(f'{r:.1f}' for r in rates['this tree'])} |\n"
        f"| base | {head(args.base)} | {base:.1f} | {', '.join(f'{r:.1f}' for r in rates['base'])} |\n\n"
        f"Ratio this tree / base: **{this / base:.3f}**.\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
