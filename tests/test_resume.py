"""A real training process killed with SIGKILL resumes from its last checkpoint to the same result."""

import json
import os
import signal
import subprocess
import sys

import torch
from click.testing import CliRunner
from conftest import wait_while_running

from hdm._cli import main
from hdm._metrics import METRIC_KEYS
from hdm._synthetic import CATEGORY, make_default_dataset

HDM = [sys.executable, "-c", "from hdm._cli import main; main()"]
STEPS = 240


def test_fit_resumes_after_sigkill_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    data = make_default_dataset(tmp_path / "data", n_train=8, n_test_good=3, n_per_defect=1, size=64)
    fit = [*HDM, "fit", "--data", str(data), "--category", CATEGORY, "--steps", str(STEPS), "--batch-size", "4",
           "--image-size", "64", "--checkpoint-every", "10", "--seed", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*fit, "--out", str(whole)], check=True, capture_output=True)

    process = subprocess.Popen([*fit, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "training_state.pt"
    wait_while_running(process, state.exists)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < STEPS and not (killed / "model.pt").exists()

    # Starting over by mistake is refused; resuming continues from the checkpoint.
    refused = CliRunner().invoke(main, ["fit", "--data", str(data), "--category", CATEGORY, "--out", str(killed)])
    assert refused.exit_code != 0 and "interrupted training" in refused.output
    resumed = subprocess.run([*HDM, "fit", "--resume", str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {killed} from step {step}" in resumed.stderr
    assert not state.exists() and (killed / "model.pt").is_file()

    metrics = {}
    for run in (whole, killed):
        subprocess.run([*HDM, "test", "--run", str(run)], check=True, capture_output=True)
        metrics[run] = json.loads((run / "metrics.json").read_text())
    # Tolerance 1e-6: the resumed run is the same computation, so only float noise may differ.
    for key in (*METRIC_KEYS, "image_recall_at_threshold", "image_fpr_at_threshold"):
        assert abs(metrics[whole][key] - metrics[killed][key]) <= 1e-6, key
    weights = [torch.load(run / "model.pt", weights_only=True)["state"] for run in (whole, killed)]
    assert all(torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6) for k in weights[0])

    again = CliRunner().invoke(main, ["fit", "--resume", str(killed)])
    assert again.exit_code != 0 and "already finished" in again.output
