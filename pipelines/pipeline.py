"""The driver: chains prepare -> train -> evaluate -> register as Ray jobs.

It owns the MLflow run tree (a parent run per pipeline, a child per stage)
and every run's final status. A stage whose manifest already carries the key
the driver computes for it is skipped, so re-running a failed or interrupted
pipeline continues where it stopped; the train stage then resumes from its
latest checkpoint.

Prepare's key covers only the data, extractor and seed sections, not the
pipeline's name: a pipeline whose data another pipeline on the same storage
has prepared reuses it, without a Ray job (see `_reuse_prepared`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipelines import images, storage, tracking
from pipelines.cluster import Ahead, Cluster, local_head_url, resolve_address
from pipelines.cluster import target as cluster_target
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput
from pipelines.stages import STAGES, TABLE


def stages_of(spec: PipelineSpec) -> tuple[str, ...]:
    """A spec with a search space trains by searching: prepare -> tune -> evaluate -> register."""
    return tuple("tune" if s == "train" and spec.tune.space else s for s in STAGES)


def stage_key(spec: PipelineSpec, stage: str, previous_key: str, inputs: dict) -> str:
    """Key = hash(previous stage's key, this stage's spec sections, the data hash once known)."""
    data_hash = inputs.get("prepare", {}).get("data", {}).get("data_hash", "")
    # The files of an image folder change under an unchanged spec: prepare's key follows them too.
    source = images.fingerprint(spec.data.uri, spec.data.labels) if stage == "prepare" and spec.data.uri else ""
    h = hashlib.sha256(f"{previous_key}|{spec.hash(*TABLE[stage].sections)}|{data_hash}{source}".encode())
    return h.hexdigest()[:16]


def entrypoint_resources(spec: PipelineSpec, stage: str, *, local: bool) -> dict[str, float]:
    """What a stage job's driver reserves (Cluster.run's num_gpus and num_cpus).

    evaluate samples on a GPU when training used them. On a remote cluster prepare reserves one train
    worker's CPUs: its driver decodes the data and fits the FID extractor, and a driver that reserves
    nothing runs on the head, beside the GCS (infra/k8s gives the head no CPUs, so prepare lands on a
    worker). A local head is one machine whose CPUs Train needs: nothing is reserved there.
    """
    return {"num_gpus": 1 if spec.train.use_gpu and stage == "evaluate" else 0,
            "num_cpus": spec.train.cpus_per_worker if stage == "prepare" and not local else 0}


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
    spec_uri = storage.join(root, spec.name, "specs", f"{spec.hash()}.json")
    storage.write_first(spec_uri, json.dumps(spec.to_dict(), indent=2).encode())
    env = {"MLFLOW_TRACKING_URI": uri, "GENPIPE_HOME": str(tracking.genpipe_home())}
    if local:
        # Ray starts a job's driver with OMP_NUM_THREADS=1 when it reserves no CPUs, which a local head's
        # stages do not (Train needs them): the stages that may take every core (Stage.all_cores) are told
        # how many there are.
        env["GENPIPE_STAGE_THREADS"] = str(len(os.sched_getaffinity(0)))
    if os.environ.get("AWS_ENDPOINT_URL"):
        env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
    todo = stages[:stages.index(until) + 1]
    dirs = [storage.join(root, spec.name, stage) for stage in todo]
    manifests = [storage.join(d, "manifest.json") for d in dirs]

    def args(i: int) -> list[str]:
        """Stage i's arguments that are known before the stages in front of it have run."""
        return ["--spec", spec_uri, "--root", root, *(["--resume"] if resume and todo[i] == "tune" else []),
                "--inputs", *manifests[:i]]

    def ahead(i: int) -> Ahead | None:
        """Stage i's job, to submit before its turn (Cluster.prestart) when it reserves nothing."""
        if i == len(todo) or any(entrypoint_resources(spec, todo[i], local=local).values()):
            return None
        return Ahead(todo[i], args(i), stage_dir=dirs[i])

    def connect() -> Cluster:
        # On a local head the first stage that will run starts its interpreter and imports as soon as the
        # head answers, while this thread's caller imports MLflow (2-4 s) and opens the run tree. A cluster
        # named by --address gets no job before the tracking server has taken the credentials.
        cluster = Cluster(resolve_address(given, log=echo)[0], log=echo)
        first = ahead(_first_to_run(spec, todo, manifests, root)) if given is None else None
        if first is not None:
            cluster.prestart(first, env=env)
        return cluster

    # A local head takes about 10 s to come up: MLflow's import, a new sqlite database and the run tree
    # are set up meanwhile. A job it submits early and that is not needed after all (the pipeline fails
    # first) is stopped, or ends when its lease stops moving (see Cluster.prestart).
    pool = ThreadPoolExecutor(1, thread_name_prefix="ray-head")
    head = pool.submit(connect)
    pool.shutdown(wait=False)
    try:
        # A cluster named by --address must answer (and take the token) before any run exists. On a local
        # head that is already up, the first stage's job goes in before MLflow's import starts here: the
        # two share this process's GIL, and that job's start (its interpreter and imports, seconds) is
        # what this driver would wait for.
        if given is not None or local_head_url():
            head.result()
        c = tracking.client()
        exp = tracking.experiment_id(c, spec.name, root)
        parent = tracking.open_run(c, exp, name=spec.name, key=spec.hash())
        runs, outputs = {"pipeline": parent}, {}
        echo(f"pipeline {spec.name}: MLflow run {parent} at {uri}; storage {root}")
        with tracking.sigterm_as_exception(), tracking.run_status(c, parent):
            cluster = head.result()
            key = ""
            for i, stage in enumerate(todo):
                key = stage_key(spec, stage, key, outputs)
                done = _read_manifest(manifests[i])
                if done and done["key"] == key:
                    echo(f"[{stage}] cached: {manifests[i]}")
                    # its job may have ended after a killed driver's last look: the records, if not yet there
                    if log := tracking.LOGGED_BY_THE_DRIVER.get(stage):
                        log(c, done["run_id"], done["outputs"])
                elif stage == "prepare" and (done := _reuse_prepared(c, exp, parent, spec.name, key, root,
                                                                      manifests[i])):
                    echo(f"[{stage}] cached: prepared by run {done['prepared_by']} ({_prepared_uri(root, key)})")
                else:
                    run_id = tracking.open_run(c, exp, name=f"{spec.name}/{stage}", key=key, parent_id=parent)
                    with tracking.run_status(c, run_id):
                        cluster.run(stage, args(i), ["--run-id", run_id, "--key", key],
                                    key=key, stage_dir=dirs[i], env=env, ahead=ahead(i + 1),
                                    **entrypoint_resources(spec, stage, local=local))
                        done = _read_manifest(manifests[i])
                        if not done or done["key"] != key:
                            raise RuntimeError(f"stage {stage} finished without writing {manifests[i]}")
                        if log := tracking.LOGGED_BY_THE_DRIVER.get(stage):
                            log(c, run_id, done["outputs"])
                    if stage == "prepare":
                        storage.write_bytes(_prepared_uri(root, key), json.dumps(done, indent=2).encode())
                runs[stage] = done["run_id"]
                outputs[stage] = done["outputs"]
    finally:
        if head.done() and head.exception() is None:
            head.result().cancel_pending()
    if given is None:
        echo(f"the local Ray head at {cluster.address} stays up for the next command; "
             "`genpipe head stop` stops it")
    result = {"pipeline": spec.name, "runs": runs}
    if "tune" in outputs:
        result["best"] = outputs["tune"]["best"]
    if "evaluate" in outputs:
        result["metrics"] = outputs["evaluate"]["metrics"]
    if "register" in outputs:
        result |= {"model": outputs["register"]["model"], "version": outputs["register"]["version"]}
    return result


def _first_to_run(spec: PipelineSpec, todo: tuple[str, ...], manifests: list[str], root: str) -> int:
    """The index of the first stage with no manifest for its key yet (len(todo) when every one has one)."""
    key, outputs = "", {}
    for i, stage in enumerate(todo):
        key = stage_key(spec, stage, key, outputs)
        done = _read_manifest(manifests[i]) or (_read_manifest(_prepared_uri(root, key)) if stage == "prepare"
                                                else None)
        if not done or done["key"] != key:
            return i
        outputs[stage] = done["outputs"]
    return len(todo)


def _prepared_uri(root: str, key: str) -> str:
    """Where the manifest of the prepare stage with this key is kept for every pipeline on `root`."""
    return storage.join(root, "prepared", f"{key}.json")


def _reuse_prepared(c, exp: str, parent: str, name: str, key: str, root: str, manifest_uri: str) -> dict | None:
    """Record data another pipeline prepared as this pipeline's prepare stage: a finished run that carries
    the same dataset input, data hash and extractor accuracy, and names the run that did the work. None
    (prepare runs as a job) when no pipeline on `root` has prepared this key, or the run that did is not
    in this tracking store (another MLflow server, or deleted): a prepare run must point at one there.

    The shards and the extractor are content-addressed (`datasets/`, `extractors/`), so there is nothing to
    copy, and a job would only re-derive them: on the digits that is a Ray job of 5 s CPU that writes the same
    bytes again."""
    from mlflow.exceptions import MlflowException

    shared = _read_manifest(_prepared_uri(root, key))
    if shared is None:
        return None
    try:
        c.get_run(shared["run_id"])
    except MlflowException:
        return None
    run_id = tracking.open_run(c, exp, name=f"{name}/prepare", key=key, parent_id=parent,
                               tags={"genpipe.prepared_by": shared["run_id"]})
    with tracking.run_status(c, run_id):
        tracking.log_prepared(c, run_id, shared["outputs"])
    done = {k: v for k, v in shared.items() if k != "timing"} | {"run_id": run_id, "prepared_by": shared["run_id"]}
    storage.write_bytes(manifest_uri, json.dumps(done, indent=2).encode())
    return done


def _read_manifest(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise InvalidInput(f"manifest {uri} is corrupt; delete it to re-run that stage") from None
