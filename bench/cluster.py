"""Ray's overhead against the plain commands doing the same work on this machine, the throughput per
worker, and what bounds the driver of an inspection job.

    .venv/bin/python bench/cluster.py [--fit-category bottle] [--steps 200] [--predict-category brain_flair]
                                      [--repeats 3] [--fit-repeats 1] [--out bench/results/cluster.md]

Fits: seeds 0 and 1 of one category, each fitted and tested, by `hdm fit --seeds 0,1` with
--engine local (one after another on both cores) and with --engine ray on a Ray cluster started here
beforehand, as an operator's is: --cpus-per-fit 2 (the same schedule, so the ratio is Ray's
overhead) and --cpus-per-fit 1 (two fits at a time). Predict: every test image of a category through
`hdm predict` (both cores) and `hdm predict --engine ray` with one actor on both cores (Ray's
overhead) and two actors on one core each. Every command is a fresh process timed whole, as a user
runs it. Figures are medians over the repeats; ratios are against the plain command of the same
repeat. Needs `pip install -e '.[ray]'` and ../shared/datasets.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hdm._data import list_images
from categories import CATEGORIES, category_folder, category_root
from timing import command_line

HDM = [sys.executable, "-m", "hdm"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def timed(command: list[str], **env: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, **env})
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def start_cluster(cpus: int):
    """A one-node Ray cluster on this machine (the head alone, `cpus` CPUs), as `ray start --head` would
    leave it; stopped by the bench through the processes it started."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False,
                                                            "object_store_memory": 500 * 2**20})
    cluster.wait_for_nodes()
    return cluster, time.perf_counter() - started


def fit_rows(category: str, steps: int, repeats: int, address: str, work: Path) -> list[tuple[str, list[float]]]:
    root = category_root(category)
    base = [*HDM, "fit", "--data", str(root), "--category", category, "--seeds", "0,1", "--steps", str(steps), "-q"]
    ways = [("plain: --engine local, 2 threads per fit, one at a time", ["--engine", "local", "--cpus-per-fit", "2"]),
            ("Ray: 1 fit at a time on 2 CPUs", ["--engine", "ray", "--address", address, "--cpus-per-fit", "2"]),
            ("Ray: 2 fits at a time on 1 CPU each", ["--engine", "ray", "--address", address, "--cpus-per-fit", "1"])]
    times: dict[str, list[float]] = {name: [] for name, _ in ways}
    for repeat in range(repeats):
        for index, (name, options) in enumerate(ways):
            out = work / f"fits-{repeat}-{index}"
            times[name].append(timed([*base, *options, "--out", str(out)]))
            shutil.rmtree(out)
            print(f"fits, repeat {repeat}: {name}: {times[name][-1]:.0f}s", flush=True)
    return list(times.items())


def predict_rows(category: str, model_category: str, repeats: int, address: str,
                 work: Path) -> tuple[list[tuple[str, list[float]]], int, dict]:
    """The model's speed does not depend on its weights: a short fit on `model_category` serves."""
    run = work / "predict-run"
    timed([*HDM, "fit", "--data", str(category_root(model_category)), "--category", model_category, "--steps", "20",
           "--out", str(run), "-q"])
    images = category_folder(category) / "test"
    files = list_images(images)
    count = len(files)
    manifest = work / "images.csv"
    timed([*HDM, "index", str(images), "--out", str(manifest)])
    base = [*HDM, "predict", "--run", str(run), str(manifest), "-q"]
    ways = [("plain: hdm predict, 2 threads", [], {"OMP_NUM_THREADS": "2"}),
            ("Ray: 1 actor on 2 CPUs", ["--engine", "ray", "--address", address, "--actors", "1", "--cpus-per-actor", "2"], {}),
            ("Ray: 2 actors on 1 CPU each", ["--engine", "ray", "--address", address, "--actors", "2", "--cpus-per-actor", "1"], {})]
    times: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    sizes = {}
    for repeat in range(repeats):
        for index, (name, options, env) in enumerate(ways):
            out = work / f"predict-{repeat}-{index}"
            times[name].append(timed([*base, *options, "--out", str(out)], **env))
            if not sizes:
                written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                read = sum(p.stat().st_size for p in files)
                sizes = {"read": read / count, "written": written / count}
            shutil.rmtree(out)
            print(f"predict, repeat {repeat}: {name}: {times[name][-1]:.1f}s", flush=True)
    return list(times.items()), count, sizes


def driver_rows_per_second(work: Path, rows: int = 200_000) -> float:
    """How fast the driver of `hdm predict --engine ray` shards and merges score rows (the part of an
    inspection job that does not spread over the cluster)."""
    from hdm._cluster import PART_COLUMNS, _read_parts, _write_part
    from hdm._predict import SCORE_COLUMNS, write_scores

    out = work / "driver"
    made = [{c: f"{c}-{i}" for c in PART_COLUMNS} | {"error": ""} for i in range(rows)]
    started = time.perf_counter()
    done: dict[str, dict] = {}
    for start in range(0, rows, 1000):
        _write_part(out, made[start:start + 1000], done)
    merged = _read_parts(out)
    write_scores(out / "scores.csv", [{c: row[c] for c in SCORE_COLUMNS} for row in merged.values()])
    return rows / (time.perf_counter() - started)


def scale_model(per_core: float, sizes: dict, driver: float, nodes: int, cores: int) -> list[str]:
    """What `nodes` CPU nodes of `cores` cores each would inspect, at this machine's per-core rate, and
    which shared part saturates first."""
    rate = per_core * nodes * cores
    read, written = rate * sizes["read"] / 2**20, rate * sizes["written"] / 2**20
    return [
        f"At {per_core:.2f} images/s per core (this machine's, linear in cores while nothing shared saturates), "
        f"{nodes} nodes of {cores} cores inspect {rate:,.0f} images/s, {rate * 3600 / 1e6:,.1f} million an hour.",
        f"- Storage: {read:,.0f} MiB/s read and {written:,.0f} MiB/s written at that rate (the writes are the "
        f"per-image overlay and mask PNGs).",
        f"- Driver: saturates at {driver:,.0f} images/s, {driver / per_core:,.0f} cores' worth "
        f"({'above' if driver > rate else 'below'} this cluster's {rate:,.0f}).",
        "- Object store: carries paths and score rows only (actors read the images from shared storage "
        "themselves), so it does not bound inspection.",
        "- GPUs: not measured here (no GPU on this machine).",
    ]


def table(rows: list[tuple[str, list[float]]], unit: str, work_done: float) -> list[str]:
    plain = rows[0][1]
    lines = [f"| way | seconds (median) | runs | {unit} | × plain (median of per-repeat ratios) |", "|---|---|---|---|---|"]
    for name, seconds in rows:
        ratio = statistics.median(s / p for s, p in zip(seconds, plain))
        lines.append(f"| {name} | {statistics.median(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} | "
                     f"{work_done / statistics.median(seconds):.3f} | {ratio:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-category", default="bottle", choices=list(CATEGORIES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--predict-category", default="brain_flair", choices=list(CATEGORIES))
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the predict commands")
    parser.add_argument("--fit-repeats", type=int, default=1, help="repeats of the fit commands")
    parser.add_argument("--nodes", type=int, default=100, help="the scale model's cluster: nodes ...")
    parser.add_argument("--cores-per-node", type=int, default=16, help="... of this many cores")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.md"))
    args = parser.parse_args()
    for category in (args.fit_category, args.predict_category):
        if not category_folder(category).is_dir():
            raise SystemExit(f"skipped: {category_folder(category)} is not here")
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("skipped: needs Ray (pip install -e '.[ray]')")

    command = command_line()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cluster, start_seconds = start_cluster(os.cpu_count() or 2)
        try:
            predicted, count, sizes = predict_rows(args.predict_category, args.fit_category, args.repeats,
                                                   cluster.address, work)
            fitted = fit_rows(args.fit_category, args.steps, args.fit_repeats, cluster.address, work)
        finally:
            cluster.shutdown()
        driver = driver_rows_per_second(work)

    per_core = count / statistics.median(predicted[2][1])  # two actors on one core each
    lines = [
        "# Ray's overhead on this machine", "",
        f"Produced by `{command}` ({os.cpu_count()} CPU cores; a one-node Ray cluster started beforehand in "
        f"{start_seconds:.1f}s, as `ray start --head` would be). Every command is a fresh process timed whole.", "",
        f"## Predict: {count} {args.predict_category} test images (a manifest from `hdm index`)", "",
        *table(predicted, "images/s", count), "",
        f"## Fits: {args.fit_category}, seeds 0 and 1, {args.steps} steps, each fitted and tested", "",
        *table(fitted, "fits/hour", 2 * 3600), "",
        "## What bounds a larger cluster", "",
        f"- Per CPU core (two actors on one core each): {per_core / 2:.2f} images/s.",
        f"- Storage per image: {sizes['read'] / 1024:.0f} KiB read, {sizes['written'] / 1024:.0f} KiB written "
        f"(overlay and mask PNGs; the scores are rows).",
        f"- The driver shards and merges {driver:,.0f} score rows/s (one process: the part that does not spread).",
        "",
        "## Scale model", "",
        *scale_model(per_core / 2, sizes, driver, args.nodes, args.cores_per_node),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
