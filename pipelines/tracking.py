"""MLflow: where runs go, the run tree of a pipeline, and run status on exit.

The driver owns every run's status. Stage jobs and train workers log into a
run id they are handed (MlflowClient, never the fluent `start_run`), so a job
that dies cannot leave its own run half-closed, and the driver marks runs
FAILED or KILLED on the way out.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pipelines import storage

if TYPE_CHECKING:  # MLflow is imported where it is used: the CLI starts a Ray head before it pays for it
    from mlflow.entities import Dataset
    from mlflow.tracking import MlflowClient

KEY_TAG = "genpipe.key"
# The environment genpipe starts an MLflow server in (`genpipe ui`, the tests' servers; infra/k8s/mlflow.yaml
# sets the same). MLflow's job execution serves GenAI jobs, which genpipe has none of, from seven huey
# consumers that each import MLflow: a server's start and 30 s idle took 31 CPU-seconds with them and 7
# without (benchmarks/mlflow_server_cpu.sh).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def genpipe_home() -> Path:
    return Path(os.environ.get("GENPIPE_HOME", ".genpipe")).expanduser().resolve()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file PATH, held for the block.

    Several `genpipe` commands may start at once on one home: the first to take the lock creates what is
    shared (the local Ray head, the MLflow database), the others wait for it and then find it there.
    An flock dies with its process, so a command killed while holding it blocks nobody.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a sqlite file under GENPIPE_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = genpipe_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def refusal(e: BaseException) -> str | None:
    """One line for an MLflow server that turned this client away (HTTP 401 or 403); None for anything else."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return None
    status = e.get_http_status_code()
    if status == 401:
        return (f"MLflow at {tracking_uri()} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD")
    if status == 403:
        said = (str(e).split("Response body: ", 1)[-1].strip(" '").splitlines() or ["-"])[0][:200]
        return f"MLflow at {tracking_uri()} denied the request (HTTP 403): {said}"
    return None


def is_local_uri(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def client() -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # The client's store creates the schema of a new database; two commands doing that at once fail
    # ("duplicate column name"). One creates it under the lock; the others find it made.
    with file_lock(Path(uri[len("sqlite:///"):] + ".lock")):
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
    return c


def experiment_id(c: MlflowClient, name: str, storage_root: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A sqlite store has no server to hold artifacts: keep them in the pipeline's storage, not in ./mlruns.
    location = None
    if is_local_uri(c.tracking_uri):
        location = (f"{storage_root}/mlflow-artifacts/{name}" if storage_root.startswith("s3://")
                    else (Path(storage_root) / "mlflow-artifacts" / name).as_uri())
    return c.create_experiment(name, artifact_location=location)


def open_run(c: MlflowClient, exp_id: str, *, name: str, key: str,
             parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run named `name` with this cache key, reopened if a previous attempt left it; else a new one.

    Reusing it is what makes a resubmitted pipeline continue in the same runs.
    """
    found = c.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.run_name = '{name}'",
                          max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {KEY_TAG: key, **(tags or {})}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    return c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def log_prepared(c: MlflowClient, run_id: str, outputs: dict) -> None:
    """Record a prepare stage's outputs in its run: the extractor's test accuracy, the bad files skipped,
    the dataset as the run's input (`lineage`) and, last, the data hash. The driver does it from the
    stage's manifest, whether the stage's job ran or another pipeline's prepare is reused: the job itself
    then needs no MLflow, whose import was a second of the first stage's start-up, in front of every
    pipeline. A run that has the data hash has the rest, and is left as it is: a driver killed after the
    job wrote its manifest leaves the records to the re-run, which finds the stage cached and calls this."""
    from mlflow.entities import DatasetInput, InputTag

    if "genpipe.data_hash" in c.get_run(run_id).data.tags:
        return
    data = outputs["data"]
    if (accuracy := outputs["extractor"]["test_accuracy"]) is not None:
        c.log_metric(run_id, "extractor/test_accuracy", accuracy)
    if "bad" in data["source"]:
        c.log_metric(run_id, "data/bad_images_skipped", data["source"]["bad"])
    # The prepared data's directory: where any of its shards is (a split can have none).
    shards = next(sh["uri"] for split in data["splits"].values() for sh in split["shards"]).rsplit("/", 1)[0]
    c.log_inputs(run_id, [DatasetInput(lineage(data), tags=[InputTag("mlflow.data.context", "training"),
                                                            InputTag("genpipe.shards", shards)])])
    c.set_tag(run_id, "genpipe.data_hash", data["data_hash"])


EVAL_TAGS = ("extractor_hash", "reference_hash", "eval_num_samples", "sampler", "bits_per_dim_kind")
"""What an evaluate stage's outputs carry that its run is tagged with (genpipe.*): what its numbers compare under."""


def log_evaluated(c: MlflowClient, run_id: str, outputs: dict) -> None:
    """Record an evaluate stage's outputs in its run: the sample grid as an artifact, then in one batch the
    eval/* metrics and the tags that say what they compare under. The driver does it from the stage's
    manifest, as for prepare (`log_prepared`), so the job needs no MLflow: its import and the tracking
    store's set-up were 3 of the evaluate job's 7 CPU-seconds on the smoke pipeline, a second of them after
    the job's turn came. A run that has the tags has the rest and is left as it is."""
    from mlflow.entities import Metric, RunTag

    if "genpipe.sampler" in c.get_run(run_id).data.tags:
        return
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp, "samples.png")
        grid.write_bytes(storage.read_bytes(outputs["grid"]))
        c.log_artifact(run_id, str(grid))
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), now, 0) for k, v in outputs["metrics"].items()],
                tags=[RunTag(f"genpipe.{k}", str(outputs[k])) for k in EVAL_TAGS if k in outputs])


LOGGED_BY_THE_DRIVER = {"prepare": log_prepared, "evaluate": log_evaluated}
"""The stages whose job leaves its MLflow records to the driver, which writes them from the job's manifest
(also for a stage it finds cached: its job may have finished after a killed driver's last look)."""


def lineage(manifest: dict) -> Dataset:
    """The MLflow dataset entity of a prepared manifest: the source URI (where the images came from, not
    the shards), the data version as digest, and a profile with the counts, size and channels that
    `genpipe models show` prints."""
    from mlflow.entities import Dataset

    src = manifest["source"]
    uri = src["uri"]
    kind = "s3" if storage.is_s3(uri) else "local" if uri.startswith("/") else "code"  # code: sklearn's digits
    c, size, _ = manifest["shape"]
    profile = {"images": sum(s["count"] for s in manifest["splits"].values()),
               "splits": {k: s["count"] for k, s in manifest["splits"].items()},
               "image_size": size, "channels": c, "num_classes": manifest["num_classes"],
               "labels": src["labels"], **({"bad_images_skipped": src["bad"]} if "bad" in src else {})}
    name = src["kind"] if src["kind"] != "image_folder" else f"image_folder:{uri.rstrip('/').rsplit('/', 1)[-1]}"
    return Dataset(name=name, digest=manifest["data_hash"][:32], source_type=kind, source=json.dumps({"uri": uri}),
                   profile=json.dumps(profile))


class Terminated(BaseException):
    """SIGTERM, turned into an exception so cleanup runs as for Ctrl-C."""


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# The runs inside a run_status block of this process, outermost first: what kill_open_runs marks.
_open_runs: list[tuple[MlflowClient, str]] = []


@contextmanager
def run_status(c: MlflowClient, run_id: str) -> Iterator[None]:
    """FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED otherwise; never left RUNNING."""
    from mlflow.entities import RunStatus

    _open_runs.append((c, run_id))
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        _terminate(c, run_id, RunStatus.KILLED)
        raise
    except BaseException:
        _terminate(c, run_id, RunStatus.FAILED)
        raise
    finally:
        _open_runs.remove((c, run_id))
    c.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def kill_open_runs() -> None:
    """Mark every run inside a run_status block KILLED now, children included, not on the way out.

    For an interrupted driver about to wait for its stage job to stop: Ray SIGKILLs a stopped job's
    driver RAY_JOB_STOP_WAIT_TIME_S (3 s by default) after its SIGTERM, which can land mid-wait, and
    a run not yet marked then stays RUNNING. run_status marks them once more on the way out (a trial
    the job reopened meanwhile), and raises what fails then: a failure here is not the last word.
    """
    from mlflow.entities import RunStatus

    for c, run_id in reversed(_open_runs):
        try:
            _terminate(c, run_id, RunStatus.KILLED)
        except Exception:
            pass


def _terminate(c: MlflowClient, run_id: str, status: int) -> None:
    """The run and its children still RUNNING (a search's trials, whose job died with it)."""
    from mlflow.entities import RunStatus

    exp = c.get_run(run_id).info.experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                                  "attributes.status = 'RUNNING'")
    for r in [*children, c.get_run(run_id)]:
        c.set_terminated(r.info.run_id, RunStatus.to_string(status))


class MetricLogger:
    """A training run's metric log into its MLflow run (run status stays the driver's): rank 0's in a
    train stage, the trial actor's in a search (pipelines/tune.py).

    A thread of its own imports MLflow, then sends each report, so training never waits on
    MLflow, from its first step on (the import alone is 4 s of a cold start): when the server
    is away (restarted, unreachable) the reports queue up and go once it answers again, in
    order. `close` waits for the queue to drain, up to `drain_s`; a search trial, which Tune
    may stop at any report, flushes at each one.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, skip_logged: bool, drain_s: float = 300):
        self.tracking_uri, self.run_id, self.skip_logged, self.drain_s = tracking_uri, run_id, skip_logged, drain_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._send_all, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.queue.put(("metrics", step, int(time.time() * 1000), {k: v for k, v in metrics.items() if k != "step"}))

    def tag(self, key: str, value: str) -> None:
        self.queue.put(("tag", key, value))

    def _send_all(self) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        logged_through = None if self.skip_logged else -1  # a restart asks MLflow (below) what it already has
        while (item := self.queue.get()) is not None:
            kind, *rest = item
            delay, warned = 1.0, False
            while True:
                try:
                    if kind == "tag":
                        client.log_batch(self.run_id, tags=[RunTag(*rest)])
                    else:
                        step, ts, metrics = rest
                        if logged_through is None:  # every report carries img_per_s
                            logged_through = max((m.step for m in client.get_metric_history(
                                self.run_id, "train/img_per_s")), default=-1)
                        if step > logged_through:
                            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
                    break
                except Exception as e:  # noqa: BLE001 - any failure: keep the report, try again
                    if not warned:
                        os.write(2, f"MLflow did not take a report ({str(e).splitlines()[0][:200]}); "
                                    "training goes on, retrying\n".encode())
                        warned = True
                    time.sleep(delay)
                    delay = min(2 * delay, 30.0)
            if warned:
                os.write(2, b"MLflow took the report; logging resumed\n")
            self.queue.task_done()

    def flush(self) -> None:
        """Wait until every report so far is in MLflow."""
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(self.drain_s)
        if self.thread.is_alive():
            os.write(2, f"{self.queue.qsize()} metric reports did not reach MLflow in {self.drain_s:.0f} s; "
                        "they are lost (the checkpoints are not)\n".encode())
