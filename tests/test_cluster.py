"""Many fits on a real Ray cluster on this machine: a head and a second node process, the object store
capped, usage statistics and the dashboard off. Skipped where `ray` is not
installed (`pip install -e '.[test,ray]'` installs it). The cluster's processes are stopped by the
process ids it started; a worker is killed by its own pid, found among the children of this
cluster's raylets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdm._synthetic import CATEGORY, make_default_dataset

ray = pytest.importorskip("ray")

HDM = [sys.executable, "-c", "from hdm._cli import main; main()"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
TINY = ["--batch-size", "4", "--image-size", "64", "--cpus-per-fit", "1", "-q"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    started.add_node(**NODE)
    started.wait_for_nodes()
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A category, and one whose only training image is not an image."""
    root = make_default_dataset(tmp_path_factory.mktemp("fleet") / "data", n_train=6, n_test_good=3,
                                n_per_defect=1, size=64)
    (root / "broken" / "train" / "good").mkdir(parents=True)
    (root / "broken" / "train" / "good" / "000.png").write_text("not an image")
    return root


def fit(data: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HDM, "fit", "--data", str(data), "--out", str(out), *TINY, *options],
                          capture_output=True, text=True, env=ENV, timeout=600)


def table(out: Path) -> dict[tuple[str, int], dict]:
    return {(r["category"], r["seed"]): r for r in json.loads((out / "fits.json").read_text())["runs"]}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state"]


def test_parallel_fits_equal_sequential_ones_and_bad_data_fails_alone(cluster, data, tmp_path):
    on_ray = [*"--category all --seeds 0,1 --steps 3 --engine ray --address".split(), cluster.address]
    parallel = fit(data, tmp_path / "ray", *on_ray)
    assert parallel.returncode == 1, parallel.stderr[-2000:]  # the broken category fails ...
    rows = table(tmp_path / "ray")
    assert {rows[("broken", s)]["state"] for s in (0, 1)} == {"failed"}
    assert "too few" in rows[("broken", 0)]["reason"] and "\n" not in rows[("broken", 0)]["reason"]
    assert {rows[(CATEGORY, s)]["state"] for s in (0, 1)} == {"done"}  # ... and the others go on
    assert "| broken | 0 | failed |" in (tmp_path / "ray" / "fits.md").read_text()

    sequential = fit(data, tmp_path / "local", "--category", CATEGORY, "--seeds", "0,1", "--steps", "3")
    assert sequential.returncode == 0, sequential.stderr[-2000:]
    for seed in (0, 1):
        run = Path(CATEGORY) / f"seed-{seed}"
        a, b = weights(tmp_path / "ray" / run), weights(tmp_path / "local" / run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), seed
    seeds = weights(tmp_path / "ray" / CATEGORY / "seed-0"), weights(tmp_path / "ray" / CATEGORY / "seed-1")
    assert not all(torch.equal(seeds[0][k], seeds[1][k]) for k in seeds[0])

    again = fit(data, tmp_path / "ray", *on_ray)
    assert again.returncode == 1
    assert {table(tmp_path / "ray")[(CATEGORY, s)]["state"] for s in (0, 1)} == {"skipped"}


def _fit_workers(cluster) -> list[int]:
    """Pids of this cluster's worker processes running a fit (named `ray::hdm fit ...` by Ray)."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent in raylets and title.startswith("ray::hdm fit"):
            found.append(int(entry.name))
    return found


def test_a_fit_whose_worker_is_killed_resumes_and_every_run_finishes(cluster, data, tmp_path):
    out = tmp_path / "runs"
    command = [*HDM, "fit", "--data", str(data), "--out", str(out), *TINY, "--category", CATEGORY, "--seeds",
               "0,1", "--steps", "150", "--checkpoint-every", "10", "--engine", "ray", "--address", cluster.address]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    states = [out / CATEGORY / f"seed-{s}" / "training_state.pt" for s in (0, 1)]
    deadline = time.monotonic() + 300
    while not any(s.exists() for s in states) or not _fit_workers(cluster):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = _fit_workers(cluster)[0]
    os.kill(victim, signal.SIGKILL)
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors[-2000:]
    rows = table(out)
    assert {rows[(CATEGORY, s)]["state"] for s in (0, 1)} == {"done"}
    for seed in (0, 1):
        run = out / CATEGORY / f"seed-{seed}"
        assert (run / "model.pt").is_file() and (run / "metrics.json").is_file()
        assert not (run / "training_state.pt").exists()
    assert victim not in _fit_workers(cluster)



def test_an_address_where_no_cluster_answers_is_one_line_at_once(data, tmp_path):
    result = fit(data, tmp_path / "runs", "--category", CATEGORY, "--engine", "ray", "--address", "127.0.0.1:1")
    assert result.returncode != 0 and "--address 127.0.0.1:1: no Ray cluster answers there" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nodes_that_cannot_see_the_data_stop_the_command_before_any_work(cluster, tmp_path):
    from hdm._cluster import check_shared_storage
    from hdm._data import HDMInputError

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        check_shared_storage(tmp_path, tmp_path)  # both nodes see this machine's folders
        with pytest.raises(HDMInputError) as error:
            check_shared_storage(tmp_path, tmp_path / "absent")
    finally:
        ray.shutdown()
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: run folders and data must be on storage every node sees")
    assert message.count(f"cannot see {tmp_path / 'absent'}") == 2 and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the marker file is gone
