"""Training on a real Ray head: DDP keeps ranks identical, and an interrupted
run resumes to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.realparts import DIGITS, GENPIPE, REPO, genpipe

pytestmark = pytest.mark.integration


def _final_checkpoint(home, name: str) -> Path:
    manifest = json.loads((home["path"] / "storage" / name / "train" / "manifest.json").read_text())
    return Path(manifest["outputs"]["checkpoint"])


def _train(home, name: str, *sets: str, config: str = "jobs/smoke.yaml") -> subprocess.CompletedProcess:
    args = ["train", "--config", config, *DIGITS, "--set", f"name={name}"]
    for s in sets:
        args += ["--set", s]
    r = genpipe(home, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _committed_checkpoint(train_dir: Path) -> bool:
    """Ray Train counts a checkpoint only once its controller has written it into the
    manager snapshot; the files land earlier, and a run cut in between restarts from 0."""
    for snapshot in train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except json.JSONDecodeError:  # caught mid-write
            pass
    return False


def _mlflow(home) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home['path'] / 'mlflow.db'}")


def test_ddp_ranks_stay_identical(home):
    _train(home, "ddp-sync", "train.steps=30", "train.checkpoint_every=10")
    c = _mlflow(home)
    run = c.search_runs([c.get_experiment_by_name("ddp-sync").experiment_id],
                        filter_string="attributes.run_name = 'ddp-sync/train'")[0]
    spread = c.get_metric_history(run.info.run_id, "train/rank_param_spread")
    assert [m.step for m in spread] == [10, 20, 30]
    assert all(m.value == 0.0 for m in spread)
    peak = c.get_metric_history(run.info.run_id, "train/peak_mem_mib")
    assert [m.step for m in peak] == [10, 20, 30]
    assert all(100 < m.value < 20_000 for m in peak)  # a torch worker's resident set: hundreds of MiB


def test_interrupted_training_resumes_to_the_uninterrupted_result(home):
    # Every checkpoint is a Ray report with an upload: 10 of them leave time to interrupt, not much more.
    sets = ["train.steps=200", "train.checkpoint_every=20", "train.log_every=20"]
    _train(home, "resume-ref", *sets)

    args = [GENPIPE, "train", "--config", "jobs/smoke.yaml", *DIGITS, "--set", "name=resume-cut"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, env=home["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train_dir = home["path"] / "storage" / "resume-cut" / "train"
    deadline = time.time() + 300
    while not _committed_checkpoint(train_dir):
        assert proc.poll() is None, "training finished or failed before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    c = _mlflow(home)
    exp = c.get_experiment_by_name("resume-cut").experiment_id
    assert {r.info.status for r in c.search_runs([exp])} <= {"KILLED", "FINISHED"}
    assert not (train_dir / "manifest.json").exists()

    r = _train(home, "resume-cut", *sets)
    assert "resuming from step" in r.stderr
    resumed_at = int(r.stderr.split("resuming from step ")[1].split()[0])
    assert 0 < resumed_at < 200
    meta = json.loads((_final_checkpoint(home, "resume-cut") / "meta.json").read_text())
    assert meta["step"] == 200
    ref = load_file(_final_checkpoint(home, "resume-ref") / "model.safetensors")
    cut = load_file(_final_checkpoint(home, "resume-cut") / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(cut[k], ref[k], rtol=0, atol=1e-6, msg=k)
    assert {r.info.status for r in c.search_runs([exp])} == {"FINISHED"}
