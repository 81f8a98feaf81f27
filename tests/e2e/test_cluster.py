"""The pipeline on a cluster laid out as infra/k8s deploys it, on this machine: a two-node
Ray cluster (token auth), an MLflow server on PostgreSQL with basic auth and its artifacts
proxied to S3 (moto), the pipeline's storage on that S3, and a user's own images: a folder of
photo patches on that S3 (PNG, JPEG and WebP, 40 to 79 px), which prepare turns into 32x32 RGB. The
`cluster` fixture (tests/realparts.py) says what runs where; tests/integration/test_image_folder.py
is such a folder's prepare stage in detail."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from tests.imagesets import photo_patches, upload
from tests.realparts import (AWS_KEY_ID, AWS_SECRET, DIGITS, MLFLOW_ADMIN_PASSWORD, MLFLOW_PASSWORD, MLFLOW_USER,
                             PG_PASSWORD, genpipe, last_json, s3_client, s3_keys)

pytestmark = pytest.mark.integration

SECRETS = (MLFLOW_PASSWORD, MLFLOW_ADMIN_PASSWORD, PG_PASSWORD, AWS_KEY_ID, AWS_SECRET)


def _without_credentials(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}


def test_pipeline_on_two_nodes_with_mlflow_on_postgres_and_s3(cluster, moto_s3, monkeypatch, tmp_path):
    s3 = s3_client(moto_s3)
    upload(photo_patches(tmp_path / "photos", per_photo=40), s3, "cluster-data/photos")  # 80 files: 2 tasks of 64
    r = genpipe(cluster, "pipeline", "--config", "jobs/smoke.yaml", "--address", cluster["address"],
                "--set", "name=cluster", "--set", "storage=s3://genpipe/cluster", "--set", "train.num_workers=2",
                "--set", "registry.model_name=cluster-dcgan", "--set", "data.source=image_folder",
                "--set", "data.uri=s3://genpipe/cluster-data/photos/", "--set", "data.image_size=32",
                "--set", "data.labels=subfolders", "--set", "data.shard_size=100", "--set", "extractor.epochs=3",
                "--set", "train.steps=20", "--set", "evaluate.num_samples=200")
    (cluster["logs"] / "pipeline.log").write_text(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["model"] == "cluster-dcgan" and out["version"] == 1
    assert all(np.isfinite(out["metrics"][k]) for k in ("fid", "kid", "precision"))
    # progress reaches the user: prepare's, and rank 0's whichever node it ran on
    assert "80/80 images (100%)" in r.stderr and "step 20/20" in r.stderr

    # The registry, through the server: every run FINISHED, the version there, its files in S3.
    for k, v in cluster["env"].items():
        if k.startswith("MLFLOW_"):
            monkeypatch.setenv(k, v)
    c = MlflowClient(cluster["mlflow"], registry_uri=cluster["mlflow"])
    runs = {stage: c.get_run(run_id) for stage, run_id in out["runs"].items()}
    assert {stage: run.info.status for stage, run in runs.items()} == dict.fromkeys(out["runs"], "FINISHED")
    mv = c.get_model_version("cluster-dcgan", "1")
    assert mv.run_id == out["runs"]["register"]
    artifacts = s3_keys(s3, "mlflow-artifacts/")
    assert any(k.endswith("/MLmodel") for k in artifacts), artifacts  # the registered pyfunc, proxied to S3
    assert any(k.endswith("/samples.png") for k in artifacts), artifacts
    with psycopg.connect(host="127.0.0.1", port=cluster["pg"]["port"], user="mlflow", password=PG_PASSWORD,
                         dbname="mlflow") as db:
        in_postgres = {row[0] for row in db.execute("select run_uuid from runs")}
    assert set(out["runs"].values()) <= in_postgres

    # Every stage's outputs and the Train checkpoints are on S3, and the train stage fetched the training
    # shards into the nodes' cache, where its workers read them (one directory for both nodes on this machine).
    stored = s3_keys(s3, "cluster/")
    assert {f"cluster/cluster/{stage}/manifest.json" for stage in out["runs"] if stage != "pipeline"} <= set(stored)
    assert any(k.endswith("model.safetensors") for k in stored)
    prepared = json.loads(s3.get_object(Bucket="genpipe", Key="cluster/cluster/prepare/manifest.json")["Body"].read())
    data = prepared["outputs"]["data"]
    assert data["shape"] == [3, 32, 32] and data["num_classes"] == 2
    assert {p.name for p in cluster["shard_cache"].glob("*.npz")} >= \
        {f"{s['sha256']}.npz" for s in data["splits"]["train"]["shards"]}

    # Train's two workers ran one on each node: as the train stage tags its run (a node id per
    # rank) and as Ray's state API says (it keeps dead actors, with their node).
    assert sorted(json.loads(runs["train"].data.tags["genpipe.train_nodes"])) == cluster["node_ids"]
    workers = cluster["ray"].state("actors", class_name="RayTrainWorker")
    assert sorted({a["node_id"] for a in workers}) == cluster["node_ids"], workers

    # The registered version, through the server and its artifact proxy: its lineage names the folder, and
    # it samples 32x32 RGB images.
    shown = genpipe(cluster, "models", "show", "cluster-dcgan@champion")
    lineage = "dataset image_folder:photos: s3://genpipe/cluster-data/photos (s3)"
    assert shown.returncode == 0 and lineage in shown.stdout, shown.stdout + shown.stderr[-2000:]
    sampled = genpipe(cluster, "sample", "models:/cluster-dcgan@champion", "-n", "4", "--out", str(tmp_path / "s.npy"))
    assert sampled.returncode == 0 and np.load(tmp_path / "s.npy").shape == (4, 3, 32, 32), sampled.stderr[-2000:]

    # The MLflow credentials reach stage jobs through the nodes' environment, never the job's
    # runtime_env (which the dashboard shows); no password is in anything the pipeline wrote.
    jobs = cluster["ray"].jobs()
    assert {j["submission_id"].split("-")[1] for j in jobs} >= {"prepare", "train", "evaluate", "register"}
    for j in jobs:
        env_vars = (j.get("runtime_env") or {}).get("env_vars", {})
        assert not set(env_vars) & {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, env_vars
    written = {f"s3://genpipe/{k}": s3.get_object(Bucket="genpipe", Key=k)["Body"].read() for k in stored + artifacts}
    written |= {f"run {stage}": json.dumps([run.data.params, run.data.tags]).encode() for stage, run in runs.items()}
    written["model version"] = json.dumps([mv.tags, mv.description, mv.source]).encode()
    written["ray jobs"] = json.dumps(jobs).encode()
    written["what it printed"] = "".join(p.stdout + p.stderr for p in (r, shown, sampled)).encode()
    written |= {str(f): f.read_bytes() for f in cluster["home"].rglob("*") if f.is_file()}
    written |= {str(f): f.read_bytes() for d in cluster["ray"].temp_dirs for f in Path(d).rglob("*")
                if f.is_file() and not f.is_symlink()}  # both nodes' session logs: what the dashboard serves
    assert any("manifest.json" in where for where in written) and any("specs/" in where for where in written)
    for secret in SECRETS:
        leaks = [where for where, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret} written to {leaks}"


def test_mlflow_with_basic_auth_refuses_a_client_without_credentials(cluster):
    bare = {"env": _without_credentials(cluster["env"])}
    wrong = {"env": {**cluster["env"], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}}
    pipeline = ["pipeline", "--config", "jobs/smoke.yaml", *DIGITS, "--address", cluster["address"],
                "--set", "name=refused", "--set", "storage=s3://genpipe/refused"]
    for who, args in ((bare, ["models", "list"]), (wrong, ["models", "list"]), (bare, pipeline)):
        r = genpipe(who, *args, timeout=300)
        assert r.returncode == 2, (args, r.stderr[-3000:])
        assert r.stderr.strip() == (f"genpipe: error: MLflow at {cluster['mlflow']} refused the credentials "
                                    "(HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), r.stderr
    assert "submitted" not in r.stderr  # the pipeline stopped before any stage job

    r = genpipe(cluster, "models", "list", timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("model"), r.stderr[-3000:]
    assert MLFLOW_PASSWORD not in r.stdout + r.stderr


def test_mlflow_answers_only_its_allowed_hosts(cluster):
    """--allowed-hosts is MLflow's DNS-rebinding guard: another Host header gets 403, /health excepted."""
    port = cluster["mlflow_port"]
    auth = "Basic " + base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode()

    def status(host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1", **headers) -> int:
        req = urllib.request.Request(f"{cluster['mlflow']}{path}", headers={"Host": host, **headers})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status("evil.example", Authorization=auth) == 403
    assert status(f"evil.example:{port}", Authorization=auth) == 403
    assert status(f"127.0.0.1:{port}", Authorization=auth) == 200
    assert status(f"localhost:{port}", Authorization=auth) == 200
    assert status(f"127.0.0.1:{port}") == 401  # right host, no credentials
    assert status("evil.example", "/health") == 200  # what infra/k8s/mlflow.yaml's probes rely on
