"""Many fits on a real Ray cluster on this machine: a head and a second node process, the object store
capped, usage statistics and the dashboard off. Skipped where `ray` is not
installed (`pip install -e '.[test,ray]'` installs it). The cluster's processes are stopped by the
process ids it started; a worker is killed by its own pid, found among the children of this
cluster's raylets."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import wait_while_running

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


def hdm(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*HDM, *arguments], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)


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


def _children(cluster, title: str) -> list[int]:
    """Pids of this cluster's worker processes whose title (`ray::<task or actor>`) holds `title`."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            name = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent in raylets and name.startswith("ray::") and title in name:
            found.append(int(entry.name))
    return found


def _fit_workers(cluster) -> list[int]:
    return _children(cluster, "ray::hdm fit")


def test_a_fit_whose_worker_is_killed_resumes_and_every_run_finishes(cluster, data, tmp_path):
    out = tmp_path / "runs"
    command = [*HDM, "fit", "--data", str(data), "--out", str(out), *TINY, "--category", CATEGORY, "--seeds",
               "0,1", "--steps", "150", "--checkpoint-every", "10", "--engine", "ray", "--address", cluster.address]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    states = [out / CATEGORY / f"seed-{s}" / "training_state.pt" for s in (0, 1)]
    wait_while_running(process, lambda: any(s.exists() for s in states) and _fit_workers(cluster))
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


def test_a_data_parallel_fit_on_two_ray_train_workers_restarts_after_a_worker_is_killed(cluster, data, tmp_path):
    options = ["--category", CATEGORY, "--steps", "120", "--checkpoint-every", "10", "--seed", "3", "--holdout", "0.25",
               "--batch-size", "4", "--image-size", "64", "-q"]
    run = tmp_path / "ray"
    process = subprocess.Popen([*HDM, "fit", "--data", str(data), "--out", str(run), *options, "--engine", "ray",
                                "--workers", "2", "--cpus-per-fit", "1", "--address", cluster.address],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    wait_while_running(process, lambda: list((run / "ray-train").glob("checkpoint_*/training_state.pt"))
                       and len(_train_workers(cluster)) == 2)
    victim = _train_workers(cluster)[1]
    os.kill(victim, signal.SIGKILL)
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors[-2000:]
    assert (run / "model.pt").is_file() and not (run / "ray-train").exists()
    assert victim not in _train_workers(cluster)

    # The same loop under torchrun, uninterrupted, makes the same model.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hdm"]
    plain = subprocess.run([*torchrun, "fit", "--data", str(data), "--out", str(tmp_path / "torchrun"), *options],
                           capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert plain.returncode == 0, plain.stderr[-8000:]  # the ranks' own messages come before torchrun's summary
    a, b = weights(run), weights(tmp_path / "torchrun")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_workers(cluster) -> list[int]:
    return _children(cluster, "ray::RayTrainWorker")


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
    assert message.startswith(f"{tmp_path}: outputs and inputs must be on storage every node sees, and node ")
    assert message.count(f"cannot see {tmp_path / 'absent'}") == 2 and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the marker file is gone


def assert_same_scores(a: Path, b: Path) -> None:
    """Two scores.csv files: the same images in the same order with the same decisions and masks, and
    scores and probabilities equal up to float rounding (a batch made of other images may round the
    last digit differently)."""
    a, b = (f.read_text().splitlines() for f in (a, b))
    assert len(a) == len(b) and a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        x, y = x.split(","), y.split(",")
        assert x[0] == y[0] and x[3:] == y[3:], (x, y)
        assert abs(float(x[1]) - float(y[1])) <= 2e-6 and abs(float(x[2]) - float(y[2])) <= 2e-6, (x, y)


@pytest.fixture(scope="module")
def scored(data, tmp_path_factory):
    """A tiny run, a folder of test images with one unreadable file, and `hdm predict`'s scores of it
    on one thread (the actors' count)."""
    root = tmp_path_factory.mktemp("inspect")
    run = root / "run"
    made = fit(data, run, "--category", CATEGORY, "--steps", "2", "--engine", "local")
    assert made.returncode == 0, made.stderr[-2000:]
    shutil.copytree(data / CATEGORY / "test", root / "images")
    (root / "images" / "good" / "zz_unreadable.png").write_text("not an image")
    plain = subprocess.run([*HDM, "predict", "--run", str(run / CATEGORY), "images", "--out", "plain", "--batch-size",
                            "4", "-q"], cwd=root, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert plain.returncode == 1 and "zz_unreadable.png" in plain.stderr
    return root, run / CATEGORY


def test_inspection_in_an_actor_pool_equals_hdm_predict_and_does_only_what_is_not_done(cluster, scored):
    root, run = scored
    assert hdm("index", "images", "--out", "images.parquet", cwd=root).returncode == 0
    on_ray = ["predict", "--run", str(run), "images.parquet", "--out", "pool", "--batch-size", "4", "--engine", "ray",
              "--address", cluster.address, "--actors", "2", "--cpus-per-actor", "1"]
    first = hdm(*on_ray, cwd=root)
    assert first.returncode == 1 and "zz_unreadable.png" in first.stderr  # listed, and the rest scored
    assert_same_scores(root / "pool" / "scores.csv", root / "plain" / "scores.csv")
    for name in ("crack/000_overlay.png", "good/000_mask.png"):
        assert (root / "pool" / name).is_file()

    # As if interrupted after three images: the job again scores only the other six.
    from hdm._cluster import PARTS, _read_parts, _write_part

    done = list(_read_parts(root / "pool").values())
    assert len(done) == 9 and sum(bool(row["error"]) for row in done) == 1
    shutil.rmtree(root / "pool" / PARTS)
    _write_part(root / "pool", done[:3], {})
    again = hdm(*on_ray, cwd=root)
    assert "predict: 3 of 9 images already done; 6 to score" in again.stderr, again.stderr[-2000:]
    assert_same_scores(root / "pool" / "scores.csv", root / "plain" / "scores.csv")
    assert len(_read_parts(root / "pool")) == 9


def test_inspection_with_onnx_runtime_in_the_actors(cluster, scored):
    root, run = scored
    assert hdm("export", "--run", str(run), "--out", "model.onnx", cwd=root).returncode == 0
    plain = hdm("predict", "--model", "model.onnx", "images", "--out", "onnx-plain", cwd=root)
    pooled = hdm("predict", "--model", "model.onnx", "images", "--out", "onnx-pool", "--engine", "ray", "--address",
                 cluster.address, "--actors", "2", cwd=root)
    assert plain.returncode == pooled.returncode == 1
    assert len((root / "onnx-pool" / "scores.csv").read_text().splitlines()) == 9
    assert_same_scores(root / "onnx-pool" / "scores.csv", root / "onnx-plain" / "scores.csv")


def _actors(cluster) -> list[int]:
    """Pids of this cluster's Ray Data actors (named `ray::MapWorker...` by Ray)."""
    return _children(cluster, "MapWorker")


def test_a_killed_actor_mid_inspection_still_scores_every_image_exactly_once(cluster, scored, tmp_path):
    root, run = scored
    images = sorted((root / "images" / "crack").parent.glob("*/0*.png"))
    for i in range(40):
        shutil.copy(images[i % len(images)], tmp_path / f"{i:03d}.png")
    command = [*HDM, "predict", "--run", str(run), str(tmp_path), "--out", str(tmp_path / "out"), "--batch-size",
               "2", "--engine", "ray", "--address", cluster.address, "--actors", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    wait_while_running(process, lambda: len(list((tmp_path / "out").glob("*_mask.png"))) >= 4 and _actors(cluster))
    os.kill(_actors(cluster)[0], signal.SIGKILL)
    _, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors[-2000:]
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == sorted(str(p) for p in tmp_path.glob("*.png"))
