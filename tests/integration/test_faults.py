"""Faults injected into a real training run, each survived.

Every test starts `genpipe train` as a user would, waits for Ray Train to
commit a checkpoint, breaks something real (a worker process, the driver, a
peer in a collective, the MLflow server, the S3 endpoint), and checks that the
run ends at exactly the configured step with every metric step in MLflow once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from tests.realparts import (
    DIGITS,
    _free_port,
    committed_checkpoint,
    committed_step,
    genpipe,
    ray_api,
    reserved_placement_groups,
    s3_client,
    s3_keys,
    set_args,
    start,
    start_mlflow_server,
    train_workers,
    wait_mlflow,
)

pytestmark = pytest.mark.integration

# Long enough that training is still going when the fault lands: a fault is injected after the first
# committed checkpoint, and on this project's 2-core VM the steps run at about 2,800 img/s (23 s in all).
STEPS, LOG_EVERY = 1000, 50
SETS = [f"train.steps={STEPS}", "train.checkpoint_every=100", f"train.log_every={LOG_EVERY}",
        "train.num_workers=2", "train.batch_size=64"]


def _args(command: str, name: str, *sets: str) -> list[str]:
    """A fault test's `genpipe COMMAND`: the smoke spec on the digits, SETS, then the test's own."""
    return [command, "--config", "jobs/smoke.yaml", *DIGITS, *set_args(f"name={name}", *SETS, *sets)]


def _start_train(home, name: str, *sets: str, extra_env: dict | None = None) -> subprocess.Popen:
    return start(home, *_args("train", name, *sets), extra_env=extra_env)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def _wait_for(what: str, cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _train_workers(home) -> list[int]:
    return sorted(p.pid for p in train_workers(home))


def _rank1(workers: list[int], db: str) -> int:
    """The worker of a 2-worker group that is not rank 0. Rank 0 has logged metrics by its first checkpoint,
    so it has MLflow's sqlite database open; rank 1 never opens it. A fault freezes rank 1: rank 0, frozen
    mid-write, would hold the database's lock."""
    (rank1,) = [pid for pid in workers if not any(f.path == db for f in psutil.Process(pid).open_files())]
    return rank1


def _train_run(c: MlflowClient, name: str):
    (run,) = c.search_runs([c.get_experiment_by_name(name).experiment_id],
                           filter_string=f"attributes.run_name = '{name}/train'")
    return run


def _assert_every_step_once(c: MlflowClient, name: str) -> None:
    run = _train_run(c, name)
    assert run.info.status == "FINISHED"
    for key in ("train/loss_d", "train/img_per_s"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), (key, sorted(steps))


def _final_step(home, name: str) -> int:
    manifest = json.loads((home["path"] / "storage" / name / "train" / "manifest.json").read_text())
    return json.loads((Path(manifest["outputs"]["checkpoint"]) / "meta.json").read_text())["step"]


def _sqlite(home) -> MlflowClient:
    """The session's MLflow store, opened under the lock genpipe's own commands take (tracking.client): a
    driver starting at the same moment may be creating its schema, and two at once break it."""
    db = home["path"] / "mlflow.db"
    with tracking.file_lock(Path(f"{db}.lock")):
        return MlflowClient(f"sqlite:///{db}")


def _read_until(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """`proc`'s stderr up to and including the first line holding `text`, read as it comes."""
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert text in "".join(lines), f"no {text!r} in: {''.join(lines)[-3000:]}"
    return "".join(lines)


def test_killed_driver_rerun_follows_the_running_train_job(home):
    """SIGKILL leaves no driver to stop the train job: the same command, run again, follows it.

    Rank 1 is frozen (SIGSTOP) from before the kill until the second command has found the job, which
    holds rank 0 in its next all-reduce: the job is still running then however fast the steps go (a run
    that had ended in between would be cached or resumed, not followed). Not rank 0: it writes the
    metrics to MLflow's sqlite database, and frozen mid-write it would hold the database's lock."""
    name = "fault-driver-kill"
    db = str(home["path"] / "mlflow.db")
    proc = _start_train(home, name)
    _wait_for("a committed checkpoint", lambda: committed_checkpoint(home["path"] / "storage" / name / "train"), proc)
    workers = _train_workers(home)
    assert len(workers) == 2
    rank1 = _rank1(workers, db)
    os.kill(rank1, signal.SIGSTOP)
    try:
        proc.kill()
        proc.wait(30)
        again = _start_train(home, name)
        head = _read_until(again, "from an earlier call is still running: following it")
    finally:
        os.kill(rank1, signal.SIGCONT)
    err = head + _finish(again)
    assert "[prepare] cached" in err
    assert _final_step(home, name) == STEPS
    _assert_every_step_once(_sqlite(home), name)
    c = _sqlite(home)
    runs = {r.info.run_name: r.info.status for r in c.search_runs([c.get_experiment_by_name(name).experiment_id])}
    assert runs == {name: "FINISHED", f"{name}/prepare": "FINISHED", f"{name}/train": "FINISHED"}


def _runs(c: MlflowClient, name: str) -> dict[str, str]:
    """Run name -> status, for pipeline NAME's runs so far."""
    exp = c.get_experiment_by_name(name)
    return {r.info.run_name: r.info.status for r in c.search_runs([exp.experiment_id])} if exp else {}


def _stage_jobs(home, name: str, stage: str) -> list[dict]:
    """The Ray jobs of one stage of one pipeline on the session's head (their metadata names both: the key
    of what a job makes, or the go file of a job submitted ahead of its turn)."""
    return [j for j in ray_api(home["address"], "/api/jobs/") if (j.get("metadata") or {}).get("genpipe_stage") == stage
            and f"/{name}/{stage}/" in j["metadata"].get("genpipe_key", j["metadata"].get("genpipe_go", ""))]


def test_sigterm_ends_every_run_killed_and_stops_the_job(home):
    """Stopped while its workers start, the train job frees their placement group: Ray frees a finished
    job's, with no PlacementGroupCleaner (ray_internals.torch_trainer leaves it out of a train stage), once
    the job has ended its Train controller first (ray_internals.controller_dies_first)."""
    name = "fault-sigterm"
    proc = _start_train(home, name)
    c = _sqlite(home)
    # The train job is submitted while prepare runs; its MLflow run is opened when prepare has finished.
    _wait_for("the train job and run", lambda: _stage_jobs(home, name, "train") and _runs(c, name).get(f"{name}/train"),
              proc)
    job_id = _stage_jobs(home, name, "train")[0]["job_id"]
    _wait_for("the train workers' placement group", lambda: reserved_placement_groups(home, job_id=job_id), proc)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "[train] stopping job" in err
    (job,) = _stage_jobs(home, name, "train")
    assert job["status"] == "STOPPED", job
    logs = ray_api(home["address"], f"/api/jobs/{job['submission_id']}/logs")["logs"]
    assert "ending the Train run's controller first" in logs, logs[-3000:]
    assert _runs(c, name) == {name: "KILLED", f"{name}/prepare": "FINISHED", f"{name}/train": "KILLED"}
    assert reserved_placement_groups(home, within=30, job_id=job_id) == []


def _stage_process(name: str, stage: str) -> psutil.Process | None:
    """The `python -m pipelines.stages STAGE` process of pipeline NAME (its --spec URI names the pipeline)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[1:4] == ["-m", "pipelines.stages", stage] and any(f"/{name}/specs/" in a for a in cmd):
            return p
    return None


def test_sigterm_marks_every_run_killed_before_a_slow_stage_job_has_stopped(home):
    """Deleting a RayJob stops its driver: SIGTERM, then SIGKILL RAY_JOB_STOP_WAIT_TIME_S later (3 s unless
    set). Every run must be KILLED within those 3 s however long the stage job takes to end. Here the
    prepare job's process is frozen (SIGSTOP, as a process stuck in I/O is): it cannot act on the SIGTERM
    its stop sends, and ends only when Ray SIGKILLs it, this head's 3 s after the driver stopped it."""
    name = "fault-sigterm-slow-stop"
    c = _sqlite(home)  # before the driver: on a new home, both would create the schema at once
    # A seed of its own: the digits other tests prepared with seed 0 would be reused, without a job to freeze.
    proc = start(home, "prepare", "--config", "jobs/smoke.yaml", *DIGITS, "--set", f"name={name}", "--set", "seed=17")
    deadline = time.time() + 120
    while (job_process := _stage_process(name, "prepare")) is None:
        assert proc.poll() is None, f"the driver ended first: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no prepare job process after 120 s"
        time.sleep(0.1)
    job_process.suspend()
    try:
        def runs() -> dict[str, str]:
            return _runs(c, name)

        # The prepare job is submitted as soon as the head answers, before the driver has opened its runs.
        _wait_for("the prepare run", lambda: runs() == {name: "RUNNING", f"{name}/prepare": "RUNNING"}, proc, 120)
        proc.terminate()
        sent = time.monotonic()
        while "RUNNING" in runs().values() and time.monotonic() - sent < 3:
            time.sleep(0.05)
        assert runs() == {name: "KILLED", f"{name}/prepare": "KILLED"}, "a run is still RUNNING 3 s after SIGTERM"
        _, err = proc.communicate(timeout=60)
    finally:
        if job_process.is_running():
            job_process.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "[prepare] stopping job" in err
    (job,) = _stage_jobs(home, name, "prepare")
    assert job["status"] == "STOPPED", job
    assert runs() == {name: "KILLED", f"{name}/prepare": "KILLED"}


def test_a_killed_worker_then_a_hung_collective_each_restart_from_the_latest_checkpoint(home):
    """Two faults in one live run, each once a checkpoint is committed: a train worker SIGKILLed; then, in
    the worker group that replaced it and once that group has committed a checkpoint of its own, its rank 1
    frozen (SIGSTOP), which leaves rank 0 in an all-reduce until the collective timeout. Each time the group
    restarts from the latest checkpoint, and the run ends at its last step, every metric step logged once.
    (One run for both: each fault costs this VM a worker group's start and the steps after it, about a
    minute.)

    The new group is listed while it trains towards its first checkpoint, so that the freeze itself is a
    file read and a signal: found only after that checkpoint (once through Ray's CLI, seconds under load),
    the steps left could run out before the freeze and leave nothing to time out."""
    name = "fault-worker-then-collective"
    train_dir = home["path"] / "storage" / name / "train"
    proc = _start_train(home, name, "train.max_failures=2", "train.collective_timeout_s=15")
    _wait_for("a committed checkpoint", lambda: committed_checkpoint(train_dir), proc)
    first = _train_workers(home)
    assert len(first) == 2
    os.kill(first[-1], signal.SIGKILL)

    head = _read_until(proc, "resuming from step ")
    resumed_at = int(head.split("resuming from step ")[1].split()[0])
    second: list[int] = []

    def replaced() -> bool:  # the group that resumed, once its process group is up (both ranks train)
        second[:] = [pid for pid in _train_workers(home) if pid not in first]
        return len(second) == 2

    _wait_for("the new worker group", replaced, proc)
    _wait_for("its first checkpoint", lambda: committed_step(train_dir) > resumed_at, proc)
    frozen = _rank1(second, str(home["path"] / "mlflow.db"))
    os.kill(frozen, signal.SIGSTOP)
    frozen_at = committed_step(train_dir)
    assert frozen_at < STEPS, "the steps ran out before the freeze"
    try:
        err = head + _finish(proc)
    finally:
        try:
            os.kill(frozen, signal.SIGKILL)
        except ProcessLookupError:
            pass
    resumed = [int(part.split()[0]) for part in err.split("resuming from step ")[1:]]
    assert len(resumed) == 2 and resumed_at == resumed[0] < resumed[1] < STEPS, (resumed, frozen_at, err[-3000:])
    # The timeout ended it, not the health check. Gloo's words: rank 0 waiting in an all-reduce, or in DDP's
    # bucketed all-reduce during backward; or Ray Train's, where rank 0 waited in a report.
    timeouts = ("Timed out waiting 15000ms", "Application timeout caused pair closure",
                "The collective operation timed out after 1")
    assert any(words in err for words in timeouts), err[-3000:]
    assert _final_step(home, name) == STEPS
    _assert_every_step_once(_sqlite(home), name)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def test_mlflow_server_restart_during_training(home, tmp_path):
    name = "fault-mlflow-restart"
    port = _free_port()
    db, artifacts = tmp_path / "mlflow.db", tmp_path / "artifacts"
    server = _mlflow_server(home, tmp_path, db, artifacts, port)
    uri = server["url"]
    try:
        proc = _start_train(home, name, extra_env={"MLFLOW_TRACKING_URI": uri})
        c = MlflowClient(uri)

        def logging() -> bool:
            exp = c.get_experiment_by_name(name)
            runs = exp and c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}/train'")
            return bool(runs and c.get_metric_history(runs[0].info.run_id, "train/img_per_s"))

        _wait_for("the first metrics in MLflow", logging, proc)
        logged_before = len(c.get_metric_history(_train_run(c, name).info.run_id, "train/img_per_s"))
        lines: list[str] = []

        def read_stderr() -> None:  # drained, or the CLI blocks on a full pipe; shown if it fails
            for line in proc.stderr:
                lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        _stop(server["proc"])  # SIGKILL: no graceful goodbye to in-flight requests
        # The server stays away until Ray Train has committed the last step's checkpoint: training can only
        # get there if no report waits for MLflow. The reports since the outage wait in rank 0's queue.
        train_dir = home["path"] / "storage" / name / "train"
        _wait_for("training to finish without MLflow", lambda: committed_step(train_dir) == STEPS, proc)
        server = _mlflow_server(home, tmp_path, db, artifacts, port)
        assert proc.wait(600) == 0, "".join(lines)[-4000:]
        reader.join(30)
        run = _train_run(c, name)
        assert run.info.status == "FINISHED"
        history = c.get_metric_history(run.info.run_id, "train/img_per_s")
        assert sorted(m.step for m in history) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert len(history) > logged_before  # some reports reached MLflow only after the restart
    finally:
        _stop(server["proc"])


def _mlflow_server(home: dict, logs: Path, db: Path, artifacts: Path, port: int) -> dict:
    server = start_mlflow_server(logs, backend_uri=f"sqlite:///{db}", artifacts=str(artifacts), env=home["env"],
                                 port=port)
    wait_mlflow(server, timeout=120)
    return server


class _FlakyProxy:
    """A TCP proxy in front of the S3 server that drops out on cue.

    Once `arm(seconds)` is called, the next request that writes a checkpoint file
    (a PUT or POST whose path names a `checkpoint_` directory) starts an outage: that
    request and every connection the proxy carries are cut, and every connection it
    is offered for `seconds` is reset at once (`refused` counts them: the retries).
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.down, self.refused, self.armed_for = upstream, False, 0, 0.0
        self.cut: bytes = b""  # the request line the outage began with
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, seconds: float) -> None:
        self.armed_for = seconds

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.down:
                self.refused += 1
                _reset(client)
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.live |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.armed_for and self._writes_a_checkpoint(data):
                    self._outage(data.split(b"\r\n", 1)[0])
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self.lock:
                    self.live.discard(s)
                _reset(s)

    @staticmethod
    def _writes_a_checkpoint(data: bytes) -> bool:
        line = data.split(b"\r\n", 1)[0]
        return line.startswith((b"PUT ", b"POST ")) and b"/checkpoint_" in line

    def _outage(self, request_line: bytes) -> None:
        seconds, self.armed_for, self.cut, self.down = self.armed_for, 0.0, request_line, True
        with self.lock:
            for s in list(self.live):
                _reset(s)
        threading.Timer(seconds, lambda: setattr(self, "down", False)).start()


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close -> RST
        s.close()
    except OSError:
        pass


def test_s3_outage_during_checkpointing(home, tmp_path):
    import numpy as np

    name = "fault-s3-outage"
    endpoint = home["env"]["AWS_ENDPOINT_URL"]
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = _FlakyProxy((host, int(port)))
    prefix = f"{name}-{os.getpid()}"
    s3 = s3_client(home["env"])
    # max_failures=0: a failed upload would fail the run; only retries can carry it through.
    sets = ("train.max_failures=0", "train.checkpoint_every=50", f"storage=s3://genpipe/{prefix}")
    proc = _start_train(home, name, *sets, extra_env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})

    def committed() -> bool:
        for key in s3_keys(s3, f"{prefix}/{name}/train/"):
            if key.endswith("checkpoint_manager_snapshot.json"):
                body = s3.get_object(Bucket="genpipe", Key=key)["Body"].read()
                return bool(json.loads(body).get("latest_checkpoint_result"))
        return False

    _wait_for("a committed checkpoint", committed, proc)
    proxy.arm(4)
    err = _finish(proc)
    assert proxy.cut, "no checkpoint was written after the proxy was armed: the test proved nothing"
    assert proxy.refused > 0  # the writer retried during the outage
    assert "resuming from step" not in err
    manifest = json.loads(s3.get_object(Bucket="genpipe", Key=f"{prefix}/{name}/train/manifest.json")["Body"].read())
    ckpt = manifest["outputs"]["checkpoint"].removeprefix("s3://genpipe/")
    meta = json.loads(s3.get_object(Bucket="genpipe", Key=f"{ckpt}/meta.json")["Body"].read())
    assert meta["step"] == STEPS
    _assert_every_step_once(_sqlite(home), name)

    # On to a registered version, S3 back up: with MLflow on sqlite there is no server to hold artifacts, so
    # the experiment keeps its own (samples, the packaged model) in the pipeline's S3 storage, and `genpipe
    # sample` reads the version from there. (Through an MLflow server's artifact proxy: tests/e2e/test_cluster.py.)
    r = genpipe(home, *_args("pipeline", name, *sets, "registry.model_name=s3-dcgan"))
    assert r.returncode == 0 and "[train] cached" in r.stderr, r.stderr[-3000:]
    artifacts = s3_keys(s3, f"{prefix}/mlflow-artifacts/{name}/")
    assert any(k.endswith("/samples.png") for k in artifacts) and any(k.endswith("/MLmodel") for k in artifacts), \
        artifacts
    r = genpipe(home, "sample", "models:/s3-dcgan@champion", "-n", "4", "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 0 and np.load(tmp_path / "s.npy").shape == (4, 1, 8, 8), r.stderr[-2000:]
