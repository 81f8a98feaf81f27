"""The driver: chains prepare -> train -> evaluate -> register as Ray jobs.

It owns the MLflow run tree (a parent run per pipeline, a child per stage)
and every run's final status. A stage whose manifest already carries the key
the driver computes for it is skipped, so re-running a failed or interrupted
pipeline continues where it stopped; the train stage then resumes from its
latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipelines import storage, tracking
from pipelines.cluster import Cluster, resolve_address
from pipelines.cluster import target as cluster_target
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput
from pipelines.stages import STAGES

# What each stage's key covers, beyond the keys of the stages before it.
STAGE_SECTIONS = {"prepare": ("data", "extractor", "seed"), "train": ("model", "train"),
                  "tune": ("model", "train", "tune"), "evaluate": ("evaluate",), "register": ("registry",)}


def stages_of(spec: PipelineSpec) -> tuple[str, ...]:
    """A spec with a search space trains by searching: prepare -> tune -> evaluate -> register."""
    return tuple("tune" if s == "train" and spec.tune.space else s for s in STAGES)


def stage_key(spec: PipelineSpec, stage: str, previous_key: str, inputs: dict) -> str:
    """Key = hash(previous stage's key, this stage's spec sections, the data hash once known)."""
    data_hash = inputs.get("prepare", {}).get("data", {}).get("data_hash", "")
    h = hashlib.sha256(f"{previous_key}|{spec.hash(*STAGE_SECTIONS[stage])}|{data_hash}".encode())
    return h.hexdigest()[:16]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(spec: PipelineSpec, *, until: str = "register", address: str | None = None, resume: bool = False,
        echo: Callable[[str], None] = log) -> dict:
    stages = stages_of(spec)
    if until not in stages:
        raise InvalidInput("the spec searches (tune.space): run genpipe tune or genpipe pipeline" if until == "train"
                           else "the spec has no tune.space: nothing to search")
    root = storage.validate(spec.storage or str(tracking.genpipe_home() / "storage"))
    given, local = cluster_target(address)
    uri = tracking.tracking_uri()
    if not local and (not storage.is_s3(root) or tracking.is_local_uri(uri)):
        raise InvalidInput(
            f"cluster {given} is remote: its workers cannot see local storage {root!r} or tracking {uri!r}; "
            "set storage: s3://bucket/prefix and MLFLOW_TRACKING_URI=http://mlflow-server:5000")
    # A local head takes about 10 s to come up: MLflow's import (2-4 s on the demo's machine), a new
    # sqlite database (2 s) and the run tree are set up meanwhile.
    pool = ThreadPoolExecutor(1, thread_name_prefix="ray-head")
    head = pool.submit(resolve_address, given, log=echo)
    pool.shutdown(wait=False)
    spec_uri = storage.join(root, spec.name, "specs", f"{spec.hash()}.json")
    storage.write_bytes(spec_uri, json.dumps(spec.to_dict(), indent=2).encode())

    env = {"MLFLOW_TRACKING_URI": uri, "GENPIPE_HOME": str(tracking.genpipe_home())}
    if os.environ.get("AWS_ENDPOINT_URL"):
        env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]

    c = tracking.client()
    exp = tracking.experiment_id(c, spec.name, root)
    parent = tracking.open_run(c, exp, name=spec.name, key=spec.hash())
    runs, outputs, manifests = {"pipeline": parent}, {}, []
    echo(f"pipeline {spec.name}: MLflow run {parent} at {uri}; storage {root}")
    with tracking.sigterm_as_exception(), tracking.run_status(c, parent):
        cluster = Cluster(head.result()[0], log=echo)
        key = ""
        for stage in stages[:stages.index(until) + 1]:
            key = stage_key(spec, stage, key, outputs)
            manifest_uri = storage.join(root, spec.name, stage, "manifest.json")
            done = _read_manifest(manifest_uri)
            if done and done["key"] == key:
                echo(f"[{stage}] cached: {manifest_uri}")
            else:
                run_id = tracking.open_run(c, exp, name=f"{spec.name}/{stage}", key=key, parent_id=parent)
                with tracking.run_status(c, run_id):
                    cluster.run(stage, ["--spec", spec_uri, "--run-id", run_id, "--key", key, "--root", root,
                                        *(["--resume"] if resume and stage == "tune" else []),
                                        "--inputs", *manifests], key=f"{manifest_uri}@{key}", env=env,
                                num_gpus=1 if spec.train.use_gpu and stage == "evaluate" else 0)
                done = _read_manifest(manifest_uri)
                if not done or done["key"] != key:
                    raise RuntimeError(f"stage {stage} finished without writing {manifest_uri}")
            runs[stage] = done["run_id"]
            outputs[stage] = done["outputs"]
            manifests.append(manifest_uri)
    result = {"pipeline": spec.name, "runs": runs}
    if "tune" in outputs:
        result["best"] = outputs["tune"]["best"]
    if "evaluate" in outputs:
        result["metrics"] = outputs["evaluate"]["metrics"]
    if "register" in outputs:
        result |= {"model": outputs["register"]["model"], "version": outputs["register"]["version"]}
    return result


def _read_manifest(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise InvalidInput(f"manifest {uri} is corrupt; delete it to re-run that stage") from None
