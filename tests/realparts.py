"""Real parts for integration tests: a local Ray head (token auth, 127.0.0.1),
MLflow on sqlite, a moto S3 server on 127.0.0.1, and the `genpipe` CLI run
as a subprocess exactly as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENPIPE = str(Path(sys.executable).with_name("genpipe"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Distinctive (moto accepts any): a test greps everything a pipeline writes for them.
AWS_KEY_ID, AWS_SECRET = "GPTESTKEYQ7W2E9R4", "gp-test-secret-5f3b7c2d1e9a"


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `genpipe`; env set for boto3, pyarrow and Ray."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=AWS_KEY_ID,
                 aws_secret_access_key=AWS_SECRET).create_bucket(Bucket="genpipe")
    yield env
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def home(tmp_path_factory, moto_s3):
    """GENPIPE_HOME for the session, with one local Ray head shared by every test.

    The head is started with the S3 environment so stage jobs can reach moto.
    """
    home = tmp_path_factory.mktemp("genpipe-home")
    env = {**os.environ, **moto_s3, "GENPIPE_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    code = "from pipelines import cluster; print(cluster.start_local_head(num_cpus=2, log=lambda m: None))"
    url = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.strip().splitlines()[-1]
    yield {"path": home, "env": env, "address": url}
    subprocess.run([sys.executable, "-c", "from pipelines import cluster; cluster.stop_local_head()"], env=env,
                   cwd=REPO, capture_output=True)


def genpipe(home: dict, *args: str, timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI; returns the completed process (stdout, stderr as text)."""
    env = {**home["env"], **(extra_env or {})}
    return subprocess.run([GENPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# Digits (scikit-learn, 8x8) keeps a real pipeline to seconds of compute.
DIGITS = ["--set", "data.source=digits", "--set", "extractor.epochs=30", "--set", "evaluate.num_samples=300",
          "--set", "evaluate.grid_size=16"]


def reserved_placement_groups(home: dict) -> list[dict]:
    """The placement groups that still reserve resources on the session's head, through Ray's state CLI."""
    ray = str(Path(sys.executable).with_name("ray"))
    r = subprocess.run([ray, "list", "placement-groups", "--address", home["address"], "--filter", "state!=REMOVED",
                        "--format", "json"], env={**home["env"], "RAY_AUTH_MODE": "token"}, capture_output=True,
                       text=True, check=True)
    return [] if r.stdout.startswith("No resource") else json.loads(r.stdout)  # how it says "none"
