"""Data-parallel fits under torchrun (two CPU ranks on gloo, on this machine): what is computed from
data comes from every rank's shard, and a killed fit resumes on as many ranks to the same model. The
same loop on Ray Train: tests/test_cluster.py."""

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import wait_while_running

from hdm._data import load_images_resized
from hdm._distributed import Ranks
from hdm._inference import calibrate
from hdm._layouts import DataSource
from hdm._runs import split_data
from hdm._store import load_model
from hdm._synthetic import CATEGORY, make_default_dataset
from hdm._train import encode

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FIT = ["--category", CATEGORY, "--steps", "120", "--batch-size", "4", "--image-size", "64", "--checkpoint-every", "10",
       "--seed", "3", "--holdout", "0.25", "-q"]


def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hdm",
            *arguments]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_default_dataset(tmp_path_factory.mktemp("ranks") / "data", n_train=12, n_test_good=3, n_per_defect=1,
                                size=64)


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """A run fitted on two ranks, uninterrupted."""
    run = tmp_path_factory.mktemp("two") / "run"
    done = subprocess.run(torchrun("fit", "--data", str(data), "--out", str(run), *FIT), capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_shards_are_contiguous_and_cover_everything_once():
    items = list(range(10))
    for world in (1, 2, 3, 4):
        parts = [Ranks(rank, world).shard(items) for rank in range(world)]
        assert sum(parts, []) == items and all(parts)
    assert Ranks().gather_rows(torch.ones(2, 3)).shape == (2, 3) and Ranks().total([1, 2.5]) == [1.0, 2.5]


def test_statistics_bank_and_thresholds_come_from_every_rank(two_ranks):
    model, extra = load_model(two_ranks / "model.pt")
    train, holdout, _ = split_data(model.config, DataSource.from_dict(extra["source"]))
    raw = encode(model.space, load_images_resized(train, 64), progress=False)
    half = len(train) // 2

    # The feature statistics are those of all training images, not of rank 0's half.
    for values, mean, std in ((raw.z, model.space.z_mean, model.space.z_std),
                              (raw.guide, model.space.guide_mean, model.space.guide_std)):
        assert torch.allclose(mean.flatten(), values.mean(dim=(0, 2, 3)), atol=1e-4)
        assert torch.allclose(std.flatten(), values.std(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mean.flatten(), values[:half].mean(dim=(0, 2, 3)), atol=1e-3)

    # Every bank cell is a normal cell of some training image, and both ranks' images gave cells.
    cells = model.space.normalise(raw).z.permute(0, 2, 3, 1).reshape(-1, raw.z.shape[1])
    distance, nearest = torch.cdist(model.density.bank, cells, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert distance.max() < 0.05 < torch.cdist(cells[:100], cells[100:200]).min()  # float noise, not another cell
    images = nearest // (raw.z.shape[2] * raw.z.shape[3])
    assert (images < half).any() and (images >= half).any()

    # The thresholds equal one process calibrating the same model on the same held-out images.
    one = copy.deepcopy(model)
    calibrate(one, holdout, model.config.calibration.target_fpr, progress=False)
    for name, value in model.calibration.summary().items():
        assert abs(value - one.calibration.summary()[name]) <= 1e-5, name


def test_a_killed_fit_resumes_on_as_many_ranks_to_the_same_model(data, two_ranks, tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(torchrun("fit", "--data", str(data), "--out", str(run), *FIT),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    state = run / "training_state.pt"
    wait_while_running(launcher, state.exists)
    ranks = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies; torchrun stops the other and gives up
    assert launcher.wait(timeout=120) != 0
    assert not (run / "model.pt").exists()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 120

    alone = subprocess.run([sys.executable, "-m", "hdm", "fit", "--resume", str(run)], capture_output=True, text=True,
                           env=ENV, timeout=600)
    assert alone.returncode != 0 and "made by 2 worker(s): resume it with as many, not 1" in alone.stderr
    assert "Traceback" not in alone.stderr

    resumed = subprocess.run(torchrun("fit", "--resume", str(run)), capture_output=True, text=True, env=ENV,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not state.exists()
    a, b = (torch.load(r / "model.pt", weights_only=True)["state"] for r in (two_ranks, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
