"""hdm on a Ray cluster (the optional extra `hdm[ray]`): many fits as Ray tasks.

Ray places the work and retries a task whose worker died; what a run still needs is read from its
folder (`_fleet.fit_and_test`), so a retried fit resumes from its last training-state checkpoint.
That only works if every node sees the same run folders and data, which is checked before any work.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

from ._config import HDMConfig
from ._data import HDMInputError
from ._fleet import FitJob, FitOutcome, fit_and_test

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


def _unseen(marker: str, token: str, data: str) -> str | None:
    """What this node cannot see of the run folder and the data, or None (runs on each node)."""
    try:
        if Path(marker).read_text() != token:
            return f"sees another {Path(marker).parent}"
    except OSError:
        return f"cannot read {Path(marker).parent}"
    if not Path(data).is_dir():
        return f"cannot see {data}"
    return None


def check_shared_storage(runs: Path, data: Path) -> None:
    """Every live node must read a file the driver just wrote into `runs` and see `data`; one line
    naming the nodes that do not, before any work."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ._store import write_bytes_atomic

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
            answers[where] = probe.options(scheduling_strategy=on_node).remote(str(marker), token, str(data))
        ready, _ = ray.wait(list(answers.values()), num_returns=len(answers), timeout=ANSWER_SECONDS)
        problems = [f"{where} {ray.get(ref) if ref in ready else 'did not answer'}"
                    for where, ref in answers.items() if ref not in ready or ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        raise HDMInputError(f"{runs}: run folders and data must be on storage every node sees, and "
                            + "; ".join(problems))


def run_fits(jobs: list[FitJob], config: HDMConfig, precision: str, cpus: int, gpus: float,
             on_done: Callable[[FitOutcome], None]) -> list[FitOutcome]:
    """One Ray task per job (`cpus` CPUs, torch on as many threads, and `gpus` GPUs each), reported as
    each finishes."""
    ray = _ray()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES)(fit_and_test)
    device = "cuda" if gpus else "cpu"
    pending = {task.options(name=f"hdm fit {job.name}").remote(job, config, device, precision, cpus): job
               for job in jobs}
    outcomes = []
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            outcome = FitOutcome(job.category, job.seed, str(job.run), "failed",
                                 f"lost to the cluster after {RETRIES} retries: {str(exc).strip().splitlines()[0]}")
        outcomes.append(outcome)
        on_done(outcome)
    return outcomes
