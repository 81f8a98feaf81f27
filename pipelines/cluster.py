"""The Ray head the stages run on: the one at --address / RAY_ADDRESS, or a
local head this CLI starts on 127.0.0.1 (token auth on) and reuses; and the
submission and following of stage jobs on it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines import ray_internals, storage
from pipelines.errors import GateFailed, InvalidInput, StageFailed
from pipelines.tracking import Terminated, file_lock, genpipe_home, kill_open_runs

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How long an interrupted driver waits for the stage job it stopped to end (infra/k8s gives Ray's
# RAY_JOB_STOP_WAIT_TIME_S, the driver's own grace, more than this).
STOP_WAIT_S = 10


# Ports handed out by free_port, one file each, shared by every genpipe process on this machine.
_PORTS = Path(tempfile.gettempdir()) / "genpipe-ports"
# Long enough for a handed-out port to be bound (a head's start on a loaded machine); after that, a port
# still in use fails free_port's bind and one no longer in use may be handed out again.
_PORT_HELD_S = 600
_random = random.SystemRandom()  # not the `random` a caller may have seeded: two processes, the same draws


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server that binds it later (Ray's head and nodes, a test's
    servers). Between the two, another process can take it: so the port is drawn from 20000-32767, which
    nothing on the machine draws from by itself (Linux hands out ephemeral ports, for bind(0) and every
    outgoing connection, from 32768 up; Ray's workers bind 10002-19999), and it is not handed out twice
    within 10 minutes by any genpipe process here (a file per port under TMP/genpipe-ports, created
    exclusively). With bind(0), a test head and a cluster started at the same moment drew the same port."""
    _PORTS.mkdir(exist_ok=True)
    while True:
        port = _random.randrange(20000, 32768)
        mark = _PORTS / str(port)
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            try:
                if time.time() - mark.stat().st_mtime < _PORT_HELD_S:
                    continue
                os.utime(mark)
            except FileNotFoundError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _alive(dashboard_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=2):
            return True
    except Exception as e:  # 401 means alive but we lack the token: still a live head
        return getattr(e, "code", None) == 401


def running_jobs(url: str) -> list[str]:
    """The ids of the jobs not yet ended on the head at URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported: a local head has token auth
    from ray.job_submission import JobSubmissionClient

    return [j.submission_id or j.job_id for j in JobSubmissionClient(url).list_jobs()
            if str(j.status.value) not in TERMINAL]


def _state_file() -> Path:
    return genpipe_home() / "ray" / "head.json"


def ray_bin() -> str:
    # The venv's `ray`, so the head's workers run this interpreter with this package installed.
    return str(Path(sys.executable).with_name("ray"))


def start_local_head(num_cpus: int | None = None, log=print) -> str:
    """A head on 127.0.0.1 with token auth, shared by every command on this GENPIPE_HOME; its dashboard URL.

    Started once: commands that start together wait on a lock for the first to bring it up."""
    with file_lock(_state_file().with_suffix(".lock")):
        url = local_head_url()
        if url:
            return url
        _ensure_token()
        cpus = num_cpus or os.cpu_count() or 1
        for attempt in range(3):  # a free port can be taken between probing it and Ray binding it
            try:
                return _start_head(cpus, log)
            except StageFailed:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def local_head_url() -> str | None:
    """The dashboard URL of this home's local head, when one is up."""
    try:
        url = json.loads(_state_file().read_text())["dashboard_url"]
    except (OSError, ValueError, KeyError):  # none, or being written or removed by another command
        return None
    return url if _alive(url) else None


def _start_head(cpus: int, log) -> str:
    gcs_port, dash_port = free_port(), free_port()
    url = f"http://127.0.0.1:{dash_port}"
    env = ray_internals.head_env(url)
    # Job entrypoints call `python`: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log(f"starting a local Ray head at {url} ({cpus} CPUs)")
    # Ports whose defaults are fixed get free ones, so two heads on one machine (a test
    # suite's and a user's) don't fight over them.
    fixed = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port")
    # A temp dir of its own: Ray resolves "auto" (how a job's driver finds its cluster) to the
    # newest head sharing a temp dir, so with the default /tmp/ray jobs run on another head.
    temp_dir = tempfile.mkdtemp(prefix="genpipe-ray-")
    cmd = [ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--num-cpus={cpus}",
           f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--include-dashboard=true", *(f"--{p}={free_port()}" for p in fixed)]
    state = _state_file()
    state.parent.mkdir(parents=True, exist_ok=True)
    # `--block` keeps `ray start` in the foreground of its own session: stopping this head
    # is then killing one process group, not `ray stop`, which stops every Ray on the machine.
    log_file = open(state.parent / "head.log", "ab")
    proc = subprocess.Popen([*_SIGINT_DEFAULT, *cmd, "--block"], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    state.write_text(json.dumps({"dashboard_url": url, "gcs_address": f"127.0.0.1:{gcs_port}", "pid": proc.pid}))
    for _ in range(120):
        if proc.poll() is not None:
            raise StageFailed(f"could not start a local Ray head; see {state.parent / 'head.log'}")
        if _alive(url):
            return url
        time.sleep(0.5)
    raise StageFailed(f"the local Ray head did not answer at {url}")


# `ray start --block` stops its head on SIGINT, which is how stop_local_head stops it. A command started
# in the background by a shell without job control, or under nohup, has SIGINT ignored, and a child
# inherits that through exec: it would then shrug the SIGINT off. This puts it back to the default
# before exec (preexec_fn would do it too, but is unsafe here: the head is started from a thread).
_SIGINT_DEFAULT = [sys.executable, "-S", "-c",
                   "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]


def stop_local_head() -> bool:
    """Stop this home's local head (only it: other Ray clusters on the machine keep running).

    False when there was none to stop."""
    with file_lock(_state_file().with_suffix(".lock")):
        state = _state_file()
        if not state.exists():
            return False
        pid = json.loads(state.read_text()).get("pid")
        state.unlink()
        if pid:
            _stop_group(pid)
        return True


def _stop_group(pid: int) -> None:
    # `ray start --block` shuts its processes down on SIGINT (in ~2 s); SIGTERM it ignores.
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(wait * 4):
            if not _running(pid):
                return
            time.sleep(0.25)


def _running(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it
            return False
    except ChildProcessError:
        pass  # not our child: started by an earlier genpipe
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def target(address: str | None) -> tuple[str | None, bool]:
    """(dashboard URL, is_local) from --address or RAY_ADDRESS; the URL is None when a local head is to be
    started. Starts nothing, so a bad address or a remote cluster with local storage is refused at once."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return None, True
    if not re.match(r"^https?://", address):
        raise InvalidInput(f"--address {address!r}: give the Ray dashboard URL, e.g. http://head:8265")
    host = re.sub(r"^https?://", "", address).split(":")[0].split("/")[0]
    return address.rstrip("/"), host in ("127.0.0.1", "localhost", "::1")


def resolve_address(address: str | None, log=print) -> tuple[str, bool]:
    """(dashboard URL, is_local) from --address, RAY_ADDRESS, or a local head (started if none is up)."""
    url, local = target(address)
    if url is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return start_local_head(log=log), True
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # without it Ray's clients send no token at all
    return url, local


def _ensure_token() -> None:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([ray_bin(), "get-auth-token", "--generate"], capture_output=True)


def _go_key(uri: str) -> str | None:
    try:
        return json.loads(storage.read_bytes(uri)).get("key")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Ahead:
    """A stage job to submit before its turn (see Cluster.prestart)."""

    stage: str
    args: list[str]  # its arguments known before the stage in front of it has finished
    stage_dir: str  # where it writes its outputs; its go file goes there too


# How often the driver renews its lease on the go files of the jobs it submitted ahead of their turn.
# stages.GO_ORPHANED_S, several times this, is how long such a job waits for a lease that stopped moving.
LEASE_S = 5.0


@dataclass
class Cluster:
    """Submits stage jobs to one Ray head and follows them to the end."""

    address: str
    log: Callable[[str], None] = print

    def __post_init__(self):
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as e:
            raise InvalidInput(f"cannot reach the Ray job API at {self.address}: {str(e).splitlines()[0]}") from None
        self.pending: dict[str, tuple[str, str]] = {}  # stage -> (job id, go file URI) of a job waiting its turn
        self._go_lock = threading.Lock()  # a go file is written by the lease thread or by `run`, never both
        self._lease: threading.Thread | None = None

    def run(self, stage: str, args: list[str], late_args: list[str], *, key: str, stage_dir: str,
            env: dict[str, str], num_gpus: float = 0, num_cpus: float = 0, ahead: Ahead | None = None) -> None:
        """Run `python -m pipelines.stages STAGE ARGS LATE_ARGS` as a job; print its log; raise on failure.

        `num_gpus` and `num_cpus` are what the job's driver reserves; a driver that reserves nothing
        runs on the head node. A job for this stage that `prestart` submitted is handed LATE_ARGS
        instead, and `ahead` is the next stage's job, submitted once this one has started.

        `key` names what the job makes in `stage_dir` (the driver passes its stage key). A job with
        the same stage, directory and key that is still running (its driver was killed, so nobody stopped it) is
        followed instead of submitting another: a second one would train the same run beside it.
        """
        metadata = {"genpipe_stage": stage, "genpipe_dir": stage_dir, "genpipe_key": key}
        with self._go_lock:
            waiting = self.pending.get(stage)
        # The job's id is known before anything is asked of the head, so that a Ctrl-C or SIGTERM landing
        # at any point from here on stops the job this stage has (waiting for its go, or just submitted).
        job_id = waiting[0] if waiting else f"genpipe-{stage}-{uuid.uuid4().hex[:8]}"
        try:
            if earlier := self._running_job(stage, key, stage_dir):
                with self._go_lock:
                    waiting = self.pending.pop(stage, None)
                if waiting:
                    self._cancel(*waiting)  # submitted ahead for a stage that turns out to be running already
                job_id = earlier
                self.log(f"[{stage}] job {job_id} from an earlier call is still running: following it")
            elif waiting:
                with self._go_lock:  # so that no lease renewal overwrites the go
                    storage.write_bytes(waiting[1], json.dumps({"key": key, "args": late_args}).encode())
                    del self.pending[stage]
                self.log(f"[{stage}] job {job_id}, submitted ahead of its turn, goes")
            else:
                self._submit(stage, job_id, [*args, *late_args], metadata, stage_dir=stage_dir, env=env,
                             num_gpus=num_gpus, num_cpus=num_cpus)
            if ahead is not None:
                self.prestart(ahead, env=env)
            self._follow(stage, job_id, stage_dir)
        except (StageFailed, InvalidInput, GateFailed):
            raise  # the job has ended
        except BaseException as e:
            self.log(f"[{stage}] stopping job {job_id}")
            self._stop(job_id, interrupted=isinstance(e, (KeyboardInterrupt, Terminated)))
            raise

    def _stop(self, job_id: str, *, interrupted: bool) -> None:
        """Stop the job and wait (up to STOP_WAIT_S) until the head says it has ended."""
        try:
            self.client.stop_job(job_id)
            if interrupted:
                # Before the wait, not after it: a job can take longer to end than Ray gives this driver
                # between the SIGTERM of a stopped RayJob and its SIGKILL (RAY_JOB_STOP_WAIT_TIME_S).
                kill_open_runs()
            for _ in range(int(STOP_WAIT_S / 0.25)):
                if str(self.client.get_job_status(job_id).value) in TERMINAL:
                    return
                time.sleep(0.25)
        except RuntimeError:
            pass  # the head never had the job: interrupted before it was created

    def prestart(self, ahead: Ahead, *, env: dict[str, str]) -> None:
        """Submit a stage's job before its turn, with the arguments known now.

        It starts its interpreter and imports its modules while the stage in front of it runs, then waits
        (stages.wait_for_go) until `run` writes the rest of its arguments (the MLflow run and key, known
        only once that stage has finished) to its go file. Meanwhile a thread renews a lease in that
        file, so that a job whose driver was killed ends instead of waiting forever. Only for a job that
        reserves nothing: one holding a GPU while it waits could hold the GPU the stage in front needs.
        """
        job_id = f"genpipe-{ahead.stage}-{uuid.uuid4().hex[:8]}"
        go = storage.join(ahead.stage_dir, f"go-{job_id}.json")
        storage.write_bytes(go, json.dumps({"lease": 0}).encode())
        with self._go_lock:
            # One submitted earlier for this stage guessed wrong about the stages in front (data prepared
            # by a pipeline the tracking store does not know runs as a job after all): it goes.
            earlier, self.pending[ahead.stage] = self.pending.get(ahead.stage), (job_id, go)
        if earlier:
            self._cancel(*earlier)
        self._submit(ahead.stage, job_id, [*ahead.args, "--go", go], {"genpipe_stage": ahead.stage, "genpipe_go": go},
                     stage_dir=ahead.stage_dir, env=env, num_gpus=0, num_cpus=0)
        if self._lease is None:
            self._lease = threading.Thread(target=self._renew_leases, name="go-lease", daemon=True)
            self._lease.start()

    def cancel_pending(self) -> None:
        """Stop the jobs still waiting for their turn (the pipeline ended before it): they never started work."""
        with self._go_lock:
            waiting, self.pending = list(self.pending.values()), {}
        for job_id, go in waiting:
            self._cancel(job_id, go)

    def _cancel(self, job_id: str, go: str) -> None:
        try:
            self.client.stop_job(job_id)
        except RuntimeError:
            pass  # interrupted before the head had it
        storage.delete(go)

    def _renew_leases(self) -> None:
        n = 0
        while True:
            time.sleep(LEASE_S)
            n += 1
            with self._go_lock:
                for _, go in self.pending.values():
                    try:
                        storage.write_bytes(go, json.dumps({"lease": n}).encode())
                    except Exception as e:  # a storage hiccup: the next renewal, 5 s on, tries again
                        self.log(f"could not renew the lease in {go}: {e}")

    def _running_job(self, stage: str, key: str, stage_dir: str) -> str | None:
        """A job still running that makes what `key` names in `stage_dir`: submitted for it, or handed it
        as its go."""
        for job in self.client.list_jobs():
            meta = job.metadata or {}
            if str(job.status.value) in TERMINAL or meta.get("genpipe_stage") != stage:
                continue
            go = meta.get("genpipe_go", "")
            if ((meta.get("genpipe_dir"), meta.get("genpipe_key")) == (stage_dir, key)
                    or (go.startswith(f"{stage_dir}/") and _go_key(go) == key)):
                return job.submission_id
        return None

    def _submit(self, stage: str, job_id: str, args: list[str], metadata: dict[str, str], *, stage_dir: str,
                env: dict[str, str], num_gpus: float, num_cpus: float) -> None:
        args = [*args, "--outcome", outcome_uri(stage_dir, job_id)]
        entrypoint = " ".join(["python", "-m", "pipelines.stages", stage, *map(shlex.quote, args)])
        for attempt in range(60):
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env={"env_vars": env},
                                       metadata=metadata, entrypoint_num_gpus=num_gpus or None,
                                       entrypoint_num_cpus=num_cpus or None)
                break
            except RuntimeError as e:  # a head that just started has no job agent for a few seconds
                if "No available agent" not in str(e) or attempt == 59:
                    raise
                time.sleep(0.5)
        self.log(f"[{stage}] job {job_id} submitted")

    def _follow(self, stage: str, job_id: str, stage_dir: str) -> None:
        """Print the job's log as it grows until the job ends; raise what its outcome says when it failed."""
        tail = LogTail(self.client, job_id, lambda line: self.log(f"[{stage}] {line}"))
        try:
            # The tail's websocket closes 1-2 s after the job ends (Ray's agent rechecks a finished log each
            # second): the status is polled instead, and the rest of the log fetched once when it ends.
            while (status := str(self.client.get_job_status(job_id).value)) not in TERMINAL:
                time.sleep(0.25)
                if not tail.following():
                    tail.catch_up()  # its websocket dropped: poll the log instead
        finally:
            tail.close()
        if status == "SUCCEEDED":
            return
        outcome = _read_outcome(outcome_uri(stage_dir, job_id))
        code = self.client.get_job_info(job_id).driver_exit_code if outcome is None else outcome["exit_code"]
        if code in _RAISES:
            why = outcome["message"] if outcome else "its reason is in its log above (its outcome file is unreadable)"
            raise _RAISES[code](f"{stage}: {why}" if code == InvalidInput.exit_code else why)
        why = (self.client.get_job_info(job_id).message or status).split(",")[0]
        raise StageFailed(f"stage {stage} failed ({why}); last log lines:\n" + "\n".join(tail.last_lines))


# A stage job that ends on one of these exceptions writes its outcome (stages.main) and exits with its code.
_RAISES = {cls.exit_code: cls for cls in (InvalidInput, GateFailed)}


def outcome_uri(stage_dir: str, job_id: str) -> str:
    """Where job JOB_ID of the stage writing to STAGE_DIR records why it ended on bad input or a missed gate."""
    return storage.join(stage_dir, "outcomes", f"{job_id}.json")


def _read_outcome(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except Exception:  # missing, or storage unreadable: the exit code still tells the kind
        return None


class LogTail:
    """Follows a job's log through Ray's websocket (`tail_job_logs`) in a thread of its own, passing each
    complete line to `emit` once. (Fetching the whole log at each poll costs its length each time, and a
    training run's log grows.)"""

    def __init__(self, client, job_id: str, emit: Callable[[str], None], keep: int = 30):
        self.client, self.job_id, self.emit = client, job_id, emit
        self.last_lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._shown = 0  # characters of the log passed on, all in complete lines
        self._partial = ""  # received after the last newline
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._consume())
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._task,),
                                        name=f"tail-{job_id}", daemon=True)
        self._thread.start()

    async def _consume(self) -> None:
        try:
            async for chunk in self.client.tail_job_logs(self.job_id):
                with self._lock:
                    if self._closed:
                        return
                    self._take(self._partial + chunk)
        except (Exception, asyncio.CancelledError):
            pass  # following() turns false, and the driver polls the log instead

    def _take(self, text: str, *, final: bool = False) -> None:
        """Pass on the complete lines of TEXT, the log from its first character not yet shown."""
        if final and text and not text.endswith("\n"):
            text += "\n"
        *lines, self._partial = text.split("\n")
        for line in lines:
            self.last_lines.append(line)
            self.emit(line)
            self._shown += len(line) + 1

    def following(self) -> bool:
        return self._thread.is_alive()

    def catch_up(self, *, final: bool = False) -> None:
        """Pass on what the log holds beyond what was shown: one fetch of the whole log. Only once the
        thread has stopped passing lines on (it ended, or `close`), so that none is passed on twice."""
        logs = self.client.get_job_logs(self.job_id)
        with self._lock:
            self._take(logs[self._shown:], final=final)

    def close(self) -> None:
        """Stop the thread, then pass on the rest of the log."""
        with self._lock:
            self._closed = True
        self._loop.call_soon_threadsafe(self._task.cancel)
        try:
            self.catch_up(final=True)
        except Exception:
            pass  # the head is gone: what was shown is all there is
