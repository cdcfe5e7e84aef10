"""hdm on a Ray cluster (the optional extra `hdm[ray]`): many fits as Ray tasks, one large fit
data-parallel through Ray Train, and inspection in a pool of actors through Ray Data.

Ray places the work and retries a task whose worker died; what a run still needs is read from its
folder (`_fleet.fit_and_test`), so a retried fit resumes from its last training-state checkpoint.
A data-parallel fit keeps its training state in Ray Train's storage inside the run folder, so a
killed worker (or the same command run again) restarts it from the last checkpoint. Inspection keeps
what is done in score shards beside the outputs, so a job run again scores only the images not yet
done. All need every node to see the same folders, which is checked before any work.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ._config import HDMConfig
from ._data import HDMInputError
from ._fleet import FitJob, FitOutcome, fit_and_test, one_line
from ._layouts import DataSource
from ._predict import SCORE_COLUMNS, Target, csv_bytes, load_detector, score_targets, write_scores
from ._store import write_bytes_atomic

# A worker that dies (killed, node lost, out of memory) costs its task a retry; a run that fails by
# itself (bad data) returns a failed outcome instead and is never retried.
RETRIES = 3
ANSWER_SECONDS = 120


def _ray():
    try:
        import ray
    except ImportError:
        raise HDMInputError("--engine ray needs Ray: pip install 'hdm[ray]'") from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` (auto: the one started on this machine by `ray start`), or start
    a Ray instance on this machine when no address is given."""
    import logging

    ray = _ray()
    if ray.is_initialized():
        return
    options = {"include_dashboard": False} if address is None else {}
    if address not in (None, "auto"):
        _answers(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **options)
    except ConnectionError as exc:
        raise HDMInputError(f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0]})") from None


def _answers(address: str) -> None:
    """Something listens at HOST:PORT (Ray itself waits minutes for a cluster that is not there)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except ValueError:
        raise HDMInputError(f"--address {address}: expected auto or HOST:PORT") from None
    except OSError as exc:
        raise HDMInputError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _unseen(marker: str, token: str, data: list[str]) -> str | None:
    """What this node cannot see of the output folder and the inputs, or None (runs on each node)."""
    try:
        if Path(marker).read_text() != token:
            return f"sees another {Path(marker).parent}"
    except OSError:
        return f"cannot read {Path(marker).parent}"
    missing = [path for path in data if not Path(path).exists()]
    return f"cannot see {', '.join(missing)}" if missing else None


def check_shared_storage(runs: Path, *data: Path) -> None:
    """Every live node must read a file the driver just wrote into the output folder `runs` and see
    each of `data`; one line naming the nodes that do not, before any work."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = _ray()
    token = uuid.uuid4().hex
    marker = runs / f".hdm-shared-{token}"
    write_bytes_atomic(marker, token.encode())
    probe = ray.remote(num_cpus=0, max_retries=0)(_unseen)
    try:
        answers = {}
        for node in (n for n in ray.nodes() if n["Alive"]):
            on_node = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            answers[where] = probe.options(scheduling_strategy=on_node).remote(str(marker), token, [str(d) for d in data])
        ready, _ = ray.wait(list(answers.values()), num_returns=len(answers), timeout=ANSWER_SECONDS)
        problems = [f"{where} {ray.get(ref) if ref in ready else 'did not answer'}"
                    for where, ref in answers.items() if ref not in ready or ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        raise HDMInputError(f"{runs}: outputs and inputs must be on storage every node sees, and "
                            + "; ".join(problems))


def run_fits(jobs: list[FitJob], config: HDMConfig, precision: str, cpus: int, gpus: float,
             on_done: Callable[[FitOutcome], None]) -> None:
    """One Ray task per job (`cpus` CPUs, torch on as many threads, and `gpus` GPUs each), each outcome
    handed to `on_done` as it finishes."""
    ray = _ray()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES)(fit_and_test)
    device = "cuda" if gpus else "cpu"
    pending = {task.options(name=f"hdm fit {job.name}").remote(job, config, device, precision, cpus): job
               for job in jobs}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            outcome = FitOutcome(job.category, job.seed, str(job.run), "failed",
                                 f"lost to the cluster after {RETRIES} retries: {one_line(exc)}")
        on_done(outcome)


TRAIN_STORAGE = "ray-train"  # below the run folder: Ray Train's checkpoints while a data-parallel fit runs


def train_parallel(config: HDMConfig, source: DataSource, run: Path, workers: int, cpus: int, gpus: float,
                   precision: str, overwrite: bool) -> None:
    """Fit one run on `workers` Ray Train workers (`cpus` CPUs and torch threads, `gpus` GPUs each;
    gloo on CPUs, NCCL on GPUs), each training on its shard of the images in `_train.fit`'s
    torch.distributed loop. A worker lost mid-fit restarts the workers from the last checkpoint; the
    same call again after the driver died restores from Ray Train's storage in the run folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ._runs import check_no_model, split_data

    run = run.resolve()
    if overwrite:
        shutil.rmtree(run / TRAIN_STORAGE, ignore_errors=True)
    else:
        check_no_model(run)
    train, holdout, extra = split_data(config, source)
    setup = {"config": config, "source": source, "train": train, "holdout": holdout, "run": run, "extra": extra,
             "cpus": cpus, "precision": precision}
    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=setup,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(name=TRAIN_STORAGE, storage_path=str(run),
                             failure_config=FailureConfig(max_failures=RETRIES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError, holding each failed worker's error
        failures = getattr(exc, "worker_failures", None) or {0: exc}
        raise HDMInputError(f"{run}: the data-parallel fit failed after {RETRIES} restarts: "
                            f"{one_line(next(iter(failures.values())))}") from None
    # finished: like training_state.pt, the resumable state goes with it
    shutil.rmtree(run / TRAIN_STORAGE, ignore_errors=True)


def _train_worker(setup: dict) -> None:
    """One Ray Train worker: resume from Ray Train's latest checkpoint if there is one, train and
    calibrate as a rank, and hand the training state to Ray Train's storage at each checkpoint."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    from ._distributed import Ranks
    from ._runs import STATE_FILE, check_same_data, train_and_save
    from ._store import load_training_state, save_training_state

    torch.set_num_threads(setup["cpus"])
    ranks = Ranks.current()
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder) / STATE_FILE)
        check_same_data(state, setup["train"], setup["holdout"], setup["source"])

    def keep(state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            if ranks.main:
                save_training_state(Path(folder) / STATE_FILE, state)
            ray.train.report({"step": state["step"]},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if ranks.main else None)

    train_and_save(setup["config"], setup["train"], setup["holdout"], setup["run"], setup["extra"], state,
                   log=lambda message: None, progress=False, device=get_device(), precision=setup["precision"],
                   keep_state=keep)


PARTS = "scores-parts"  # below the output folder: one CSV shard per stretch of finished images
PART_ROWS, PART_SECONDS = 1000, 30.0  # a shard is written at whichever comes first
PART_COLUMNS = [*SCORE_COLUMNS, "error"]


class Scorer:
    """An actor of the pool: loads the model once, then decodes, scores and writes the outputs of
    batches of images with hdm's own loader and writers, as `hdm predict` does."""

    def __init__(self, model: str, out: str, save_maps: bool, threads: int, device: str):
        import torch

        torch.set_num_threads(threads)
        self.model = load_detector(Path(model), device, threads=threads)
        self.out, self.save_maps = Path(out), save_maps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        targets = [Target(Path(p), Path(o)) for p, o in zip(batch["path"], batch["output"])]
        rows, errors = score_targets(self.model, targets, self.out, self.save_maps, len(targets), progress=False)
        rows = [{**row, "error": ""} for row in rows]
        rows += [{**{c: "" for c in SCORE_COLUMNS}, "path": path, "error": reason} for path, reason in errors]
        return {c: np.array([str(row[c]) for row in rows], dtype=object) for c in PART_COLUMNS}


def _read_parts(out: Path) -> dict[str, dict]:
    """Every image a shard holds, by path (a later shard wins: a retried batch may be there twice)."""
    done: dict[str, dict] = {}
    for part in sorted((out / PARTS).glob("part-*.csv")):
        with part.open(newline="") as handle:
            done.update((row["path"], row) for row in csv.DictReader(handle))
    return done


def _write_part(out: Path, rows: list[dict], done: dict[str, dict]) -> None:
    """A new shard of `rows`, which then count as done."""
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.csv"
    write_bytes_atomic(out / PARTS / name, csv_bytes({c: [row[c] for row in rows] for c in PART_COLUMNS}))
    done.update((row["path"], row) for row in rows)


def predict(model: Path, targets: list[Target], out: Path, save_maps: bool, batch_size: int, actors: int,
            cpus: int, gpus: float, log: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    """Score the targets not yet in `out`'s shards in a pool of `actors` actors (`cpus` CPUs and torch or
    onnxruntime threads, `gpus` GPUs each), shard the scores as they arrive, then merge every shard into
    `out/scores.csv` in the targets' order; returns its rows and the unreadable files' reasons."""
    import logging

    ray = _ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Actors on other nodes have other working folders: they get absolute paths, shown as given at the end.
    absolute = [os.path.abspath(t.source) for t in targets]
    done = _read_parts(out)
    todo = [(a, t) for a, t in zip(absolute, targets) if a not in done]
    log(f"predict: {len(targets) - len(todo)} of {len(targets)} images already done; {len(todo)} to score "
        f"in {actors} actors")
    if todo:
        import pyarrow

        table = pyarrow.table({"path": [a for a, _ in todo], "output": [str(t.relative) for _, t in todo]})
        blocks = max(actors, min(len(todo) // batch_size, 32 * actors))
        scored = ray.data.from_arrow(table, override_num_blocks=blocks).map_batches(
            Scorer, fn_constructor_kwargs={"model": str(model), "out": str(out), "save_maps": save_maps,
                                           "threads": cpus, "device": "cuda" if gpus else "cpu"},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=gpus)
        pending, flushed = [], time.monotonic()
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            pending += [dict(zip(PART_COLUMNS, values)) for values in zip(*(batch[c] for c in PART_COLUMNS))]
            if len(pending) >= PART_ROWS or time.monotonic() - flushed > PART_SECONDS:
                _write_part(out, pending, done)
                log(f"predict: {len(done)} of {len(targets)} images done")
                pending, flushed = [], time.monotonic()
        if pending:
            _write_part(out, pending, done)
    ordered = [{**done[a], "path": str(t.source)} for a, t in zip(absolute, targets)]
    rows = [{c: row[c] for c in SCORE_COLUMNS} for row in ordered if not row["error"]]
    write_scores(out / "scores.csv", rows)
    return rows, [row["error"] for row in ordered if row["error"]]
