"""Many runs at once: a fit and a test per (category, seed) under one folder, on this machine or on a
Ray cluster (`_cluster.py`).

`RUNS/<category>[/seed-K]` is exactly the run folder `hdm fit` writes. What a run still needs is read
from its folder, so the same command run again skips finished runs, tests fitted ones and resumes
interrupted fits from their training state. One run's failure is its own row: the others go on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ._config import HDMConfig, resolve
from ._data import HDMInputError
from ._metrics import METRIC_KEYS
from ._runs import MODEL_FILE, STATE_FILE, fit_run, resume_run, test_run

METRICS_FILE = "metrics.json"
TABLE = "fits"  # RUNS/fits.md and RUNS/fits.json


@dataclass(frozen=True)
class FitJob:
    """One run to make: a category of the data root, at the configuration's seed (None) or at `seed`."""

    root: Path
    category: str
    seed: int | None
    run: Path

    @property
    def name(self) -> str:
        return _name(self.category, self.seed)


@dataclass
class FitOutcome:
    """How a run ended: done (fitted and tested now), skipped (done before), or failed with its reason."""

    category: str
    seed: int | None
    run: str
    state: str
    reason: str = ""
    fit_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _name(category: str, seed: int | None) -> str:
    return category if seed is None else f"{category} seed {seed}"


def plan(root: Path, categories: list[str], seeds: list[int] | None, runs: Path) -> list[FitJob]:
    """A job per (category, seed): `runs/<category>`, or `runs/<category>/seed-K` when seeds are given."""
    if len(set(categories)) != len(categories) or (seeds and len(set(seeds)) != len(seeds)):
        raise HDMInputError("a category or seed is named twice")
    root, runs = root.resolve(), runs.resolve()
    if not seeds:
        return [FitJob(root, c, None, runs / c) for c in categories]
    return [FitJob(root, c, s, runs / c / f"seed-{s}") for c in categories for s in seeds]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fit_seconds(run: Path) -> float | None:
    log = run / "train_log.json"
    return json.loads(log.read_text())["training"]["train_seconds"] if log.is_file() else None


def fit_and_test(job: FitJob, config: HDMConfig, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None) -> FitOutcome:
    """Bring one run to done from wherever its folder stands; never raises for the run's own failure."""
    import torch

    from ._layouts import DataSource

    if threads:
        torch.set_num_threads(threads)
    run, outcome = job.run, FitOutcome(job.category, job.seed, str(job.run), "done")
    try:
        if (run / MODEL_FILE).is_file() and not (run / STATE_FILE).exists() and (run / METRICS_FILE).is_file():
            outcome.state = "skipped"
        elif (run / STATE_FILE).exists():
            resume_run(run, progress=False, device=device, precision=precision)
        elif not (run / MODEL_FILE).is_file():
            seeded = config if job.seed is None else resolve(config, {"train.seed": job.seed})
            fit_run(seeded, DataSource.detect(job.root, job.category), run, progress=False, device=device,
                    precision=precision)
        if outcome.state == "done":
            test_run(run, progress=False, device=device, precision=precision)
        metrics = json.loads((run / METRICS_FILE).read_text())
        outcome.metrics = {k: metrics[k] for k in METRIC_KEYS}
        outcome.fit_seconds = _fit_seconds(run)
    except Exception as exc:  # a run's failure, whatever it is, is its row; the others go on
        outcome.state, outcome.reason = "failed", one_line(exc)
    return outcome


def describe(outcome: FitOutcome) -> str:
    """One progress line for a finished run."""
    name = _name(outcome.category, outcome.seed)
    if outcome.state == "failed":
        return f"fit: {name} failed: {outcome.reason}"
    figures = ", ".join(f"{k} {outcome.metrics[k]:.4f}" for k in METRIC_KEYS[:3])
    when = "already done" if outcome.state == "skipped" else f"done, fit {outcome.fit_seconds:.0f}s"
    return f"fit: {name} {when}: {figures}"


def table(outcomes: list[FitOutcome], command: str) -> str:
    """Every run's state, fit time and metrics as Markdown, with the command that made it."""
    lines = [f"# Runs\n\nMade by `{command}`.\n",
             "| category | seed | state | fit s | " + " | ".join(METRIC_KEYS) + " | reason |",
             "|---" * (len(METRIC_KEYS) + 5) + "|"]
    for o in outcomes:
        seconds = "–" if o.fit_seconds is None else f"{o.fit_seconds:.0f}"
        figures = [f"{o.metrics[k]:.4f}" if k in o.metrics else "–" for k in METRIC_KEYS]
        seed = "–" if o.seed is None else str(o.seed)
        lines.append(f"| {o.category} | {seed} | {o.state} | {seconds} | " + " | ".join(figures)
                     + f" | {o.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_table(runs: Path, outcomes: list[FitOutcome], command: str) -> None:
    from ._store import write_bytes_atomic, write_json

    write_bytes_atomic(runs / f"{TABLE}.md", table(outcomes, command).encode())
    write_json(runs / f"{TABLE}.json", {"command": command, "runs": [asdict(o) for o in outcomes]})


def fit_fleet(root: Path, category: str, seeds: list[int] | None, runs: Path, config: HDMConfig,
              engine: str = "local", address: str | None = None, cpus: int | None = None, gpus: float = 0.0,
              device: str = "auto", precision: str = "fp32", command: str = "hdm fit",
              log: Callable[[str], None] = lambda message: None) -> list[FitOutcome]:
    """Fit and test every (category, seed) of `root` (`category`: all, or names joined by commas) into
    `runs`, here one after another or (engine "ray") as tasks on the Ray cluster at `address`, each on
    `cpus` torch threads (ray: 1 unless given) and `gpus` GPUs; log each run as it finishes, then write
    RUNS/fits.md and RUNS/fits.json. The same seed on the same number of threads gives the same weights
    on either engine."""
    from ._layouts import categories

    names = categories(root) if category == "all" else [c.strip() for c in category.split(",") if c.strip()]
    jobs = plan(root, names, seeds, runs)
    runs.mkdir(parents=True, exist_ok=True)
    if engine == "ray":
        from . import _cluster

        _cluster.connect(address)
        _cluster.check_shared_storage(runs.resolve(), root.resolve())
    log(f"fit: {len(jobs)} runs into {runs} ({engine})")
    started, outcomes = time.perf_counter(), []

    def on_done(outcome: FitOutcome) -> None:
        outcomes.append(outcome)
        log(f"{describe(outcome)} ({len(outcomes)}/{len(jobs)}, {time.perf_counter() - started:.0f}s)")

    if engine == "ray":
        _cluster.run_fits(jobs, config, precision, cpus or 1, gpus, on_done)
    else:
        for job in jobs:
            on_done(fit_and_test(job, config, device, precision, cpus))
    order = {str(job.run): i for i, job in enumerate(jobs)}
    outcomes.sort(key=lambda o: order[o.run])
    write_table(runs, outcomes, command)
    return outcomes
