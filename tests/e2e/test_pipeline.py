"""`genpipe pipeline` end to end through the real CLI: a local Ray head,
MLflow on sqlite, storage on local disk. (On S3 storage, moto's: tests/integration/test_faults.py's S3
outage, with MLflow on sqlite, and tests/e2e/test_cluster.py, through an MLflow server.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.realparts import DIGITS, genpipe, last_json, sqlite_client

pytestmark = pytest.mark.integration


def test_smoke_pipeline_local_then_cached_then_sampled(home, tmp_path):
    args = ["pipeline", "--config", "jobs/smoke.yaml", *DIGITS, "--set", "name=e2e-local"]
    r = genpipe(home, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["pipeline"] == "e2e-local" and out["model"] == "smoke-dcgan" and out["version"] == 1
    assert set(out["runs"]) == {"pipeline", "prepare", "train", "evaluate", "register"}
    for k in ("fid", "kid", "is", "precision", "recall"):
        assert np.isfinite(out["metrics"][k]), k
    assert "[train] " in r.stderr and "step 60/60" in r.stderr  # progress reaches the user
    # On a local head prepare fits the extractor on the machine's cores, not on the one Ray gives a job that
    # reserves none (whichever of the session's pipelines fitted this one: every one runs on a local head)
    prepared = json.loads((home["path"] / "storage/e2e-local/prepare/manifest.json").read_text())
    info = Path(prepared["outputs"]["extractor"]["uri"]).with_name("extractor.json")
    assert json.loads(info.read_text())["threads"] == len(os.sched_getaffinity(0))

    c = sqlite_client(home)
    for stage, run_id in out["runs"].items():
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED", stage
        if stage != "pipeline":
            assert run.data.tags["mlflow.parentRunId"] == out["runs"]["pipeline"]
    assert c.get_run(out["runs"]["train"]).data.metrics["train/img_per_s"] > 0
    assert "samples.png" in [a.path for a in c.list_artifacts(out["runs"]["evaluate"])]
    champion = c.get_model_version_by_alias("smoke-dcgan", "champion")
    assert str(champion.version) == "1" and champion.tags["family"] == "dcgan"
    assert str(c.get_model_version_by_alias("smoke-dcgan", "challenger").version) == "1"

    # The driver logs what evaluate measured from its manifest (the job imports no MLflow). A driver killed
    # after the job wrote it left a run without those records: the re-run, finding the stage cached, writes them.
    evaluated = c.get_run(out["runs"]["evaluate"]).data
    assert evaluated.tags["genpipe.eval_num_samples"] == "300" and evaluated.metrics["eval/fid"] == out["metrics"]["fid"]
    c.delete_tag(out["runs"]["evaluate"], "genpipe.sampler")
    again = genpipe(home, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["version"] == 1
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"[{stage}] cached" in again.stderr
    assert c.get_run(out["runs"]["evaluate"]).data.tags["genpipe.sampler"] == evaluated.tags["genpipe.sampler"]

    npy, png = tmp_path / "s.npy", tmp_path / "grid.png"
    r = genpipe(home, "sample", "models:/smoke-dcgan@champion", "-n", "16", "--out", str(npy))
    assert r.returncode == 0, r.stderr[-2000:]
    x = np.load(npy)
    assert x.shape == (16, 1, 8, 8) and x.dtype == np.uint8 and x.std() > 0
    r = genpipe(home, "sample", "models:/smoke-dcgan@champion", "-n", "16", "--out", str(png))
    assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    listing = genpipe(home, "models", "list")
    assert listing.returncode == 0 and "smoke-dcgan" in listing.stdout and "champion" in listing.stdout

