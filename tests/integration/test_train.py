"""Training on a real Ray head: DDP keeps ranks identical, an interrupted run
resumes to the same result as an uninterrupted one, a corrupt checkpoint is
refused, and a non-finite loss stops or rolls back."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.realparts import DIGITS, committed_checkpoint, digest, genpipe, one_clear_line, set_args, start

pytestmark = pytest.mark.integration


def _final_checkpoint(home, name: str) -> Path:
    manifest = json.loads((home["path"] / "storage" / name / "train" / "manifest.json").read_text())
    return Path(manifest["outputs"]["checkpoint"])


def _train(home, name: str, *sets: str, config: str = "jobs/smoke.yaml") -> subprocess.CompletedProcess:
    r = genpipe(home, "train", "--config", config, *DIGITS, *set_args(f"name={name}", *sets))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _mlflow(home) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home['path'] / 'mlflow.db'}")


def test_interrupted_training_resumes_to_the_uninterrupted_result(home):
    # Long enough to be still training when the signal lands after the first checkpoint: 400 steps to go,
    # about 9 s on the project's 2-core VM, where the stop took the workers less than 50 steps past it.
    sets = ["train.steps=500", "train.checkpoint_every=100", "train.log_every=50"]
    _train(home, "resume-ref", *sets)
    # The uninterrupted run's two DDP ranks held the same weights at every checkpoint (rank 0 logs the
    # largest difference between them), and each worker's memory was measured there too.
    c = _mlflow(home)
    (run,) = c.search_runs([c.get_experiment_by_name("resume-ref").experiment_id],
                           filter_string="attributes.run_name = 'resume-ref/train'")
    checkpoints = list(range(100, 501, 100))
    spread = c.get_metric_history(run.info.run_id, "train/rank_param_spread")
    assert [m.step for m in spread] == checkpoints and all(m.value == 0.0 for m in spread)
    peak = c.get_metric_history(run.info.run_id, "train/peak_mem_mib")
    assert [m.step for m in peak] == checkpoints
    assert all(100 < m.value < 20_000 for m in peak)  # a torch worker's resident set: hundreds of MiB

    # The reference's weights cut short, as by an upload that failed half-way: evaluate refuses them before
    # anything loads them (one line, exit 2), and the trained stage is as it was once the file is whole.
    ref_dir = home["path"] / "storage" / "resume-ref" / "train"
    before = digest(ref_dir)
    weights = _final_checkpoint(home, "resume-ref") / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    try:
        refused = genpipe(home, "evaluate", "--config", "jobs/smoke.yaml", *DIGITS, *set_args("name=resume-ref", *sets))
        one_clear_line(refused, "model.safetensors is corrupt: checksum")
        assert not (home["path"] / "storage" / "resume-ref" / "evaluate" / "manifest.json").exists()
    finally:
        weights.write_bytes(data)
    assert digest(ref_dir) == before

    proc = start(home, "train", "--config", "jobs/smoke.yaml", *DIGITS, *set_args("name=resume-cut", *sets))
    train_dir = home["path"] / "storage" / "resume-cut" / "train"
    deadline = time.time() + 300
    while not committed_checkpoint(train_dir):
        assert proc.poll() is None, "training finished or failed before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    exp = c.get_experiment_by_name("resume-cut").experiment_id
    assert {r.info.status for r in c.search_runs([exp])} <= {"KILLED", "FINISHED"}
    assert not (train_dir / "manifest.json").exists()

    r = _train(home, "resume-cut", *sets)
    assert "resuming from step" in r.stderr
    resumed_at = int(r.stderr.split("resuming from step ")[1].split()[0])
    assert 0 < resumed_at < 500
    meta = json.loads((_final_checkpoint(home, "resume-cut") / "meta.json").read_text())
    assert meta["step"] == 500
    ref = load_file(_final_checkpoint(home, "resume-ref") / "model.safetensors")
    cut = load_file(_final_checkpoint(home, "resume-cut") / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(cut[k], ref[k], rtol=0, atol=1e-6, msg=k)
    assert {r.info.status for r in c.search_runs([exp])} == {"FINISHED"}


# An Adam learning rate of 1e4 sends the VAE's weights, then its loss, to inf/NaN within a few steps.
BLOW_UP = ["model.lr=10000", "train.use_gpu=false", "train.num_workers=2", "train.batch_size=64",
           "train.max_failures=0", "train.steps=40", "train.checkpoint_every=20", "train.log_every=10"]


def test_non_finite_loss_stops_with_a_clear_error(home):
    r = genpipe(home, "train", "--config", "jobs/vae.yaml", *DIGITS, *set_args("name=nan-stop", *BLOW_UP))
    assert r.returncode == 1
    # The job's last log lines close the error, after its log was streamed.
    tail = r.stderr.split("stage train failed (")[1]
    assert "non-finite training metrics" in tail and "train.on_nan: rollback" in tail
    c = _mlflow(home)
    exp = c.get_experiment_by_name("nan-stop").experiment_id
    (run,) = c.search_runs([exp], filter_string="attributes.run_name = 'nan-stop/train'")
    assert run.info.status == "FAILED"
    # Nothing non-finite was logged: the check runs before the report.
    for key in run.data.metrics:
        assert all(math.isfinite(m.value) for m in c.get_metric_history(run.info.run_id, key)), key


def test_non_finite_loss_rolls_back_with_a_lower_learning_rate(home):
    # x1e-6 takes lr 1e4 to 1e-2, where the VAE trains: one rollback, to the start, then to the end.
    r = _train(home, "nan-rollback", *BLOW_UP, "train.on_nan=rollback", "train.nan_lr_factor=1e-6",
               config="jobs/vae.yaml")
    assert "rolled back to step 0, learning rates x1e-06 (rollback 1/3)" in r.stderr
    meta = json.loads((_final_checkpoint(home, "nan-rollback") / "meta.json").read_text())
    assert meta["step"] == 40
    weights = load_file(_final_checkpoint(home, "nan-rollback") / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    c = _mlflow(home)
    exp = c.get_experiment_by_name("nan-rollback").experiment_id
    (run,) = c.search_runs([exp], filter_string="attributes.run_name = 'nan-rollback/train'")
    loss = c.get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in loss) == 40 and all(math.isfinite(m.value) for m in loss)
