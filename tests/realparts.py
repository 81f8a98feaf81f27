"""Real parts for integration tests: a local Ray head (token auth, 127.0.0.1),
MLflow on sqlite, a moto S3 server on 127.0.0.1, and the `genpipe` CLI run
as a subprocess exactly as a user runs it. For the cluster tests: PostgreSQL,
an MLflow server on it (basic auth, artifacts on S3) and a two-node Ray cluster."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.cluster import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
GENPIPE = str(Path(sys.executable).with_name("genpipe"))




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
    s3_client(env).create_bucket(Bucket="genpipe")
    yield env
    proc.terminate()
    proc.wait(10)


def s3_client(env: dict):
    """A boto3 S3 client on the moto server that env names (moto_s3's, or a home's)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def s3_keys(s3, prefix: str) -> list[str]:
    """Every key under prefix in the bucket `genpipe`."""
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="genpipe", Prefix=prefix)
            for o in page.get("Contents", [])]


def home_env(path: Path, moto_s3: dict) -> dict:
    """The environment of a `genpipe` on GENPIPE_HOME=PATH: moto's S3, and none of the Ray, MLflow, AWS or
    genpipe settings of whoever runs the suite (a cluster address, a tracking server, a profile, a token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "GENPIPE_"))}
    # The node cache of S3 shards (pipelines/data.py) in the home too: nothing left in the machine's /tmp.
    return {**env, **moto_s3, "GENPIPE_HOME": str(path), "GENPIPE_SHARD_CACHE": str(path / "shard-cache")}


@pytest.fixture(scope="session")
def home(tmp_path_factory, moto_s3):
    """GENPIPE_HOME for the session, with one local Ray head shared by every test.

    The head is started with the S3 environment so stage jobs can reach moto.
    """
    home = tmp_path_factory.mktemp("genpipe-home")
    env = home_env(home, moto_s3)
    code = "from pipelines import cluster; print(cluster.start_local_head(num_cpus=2, log=lambda m: None))"
    url = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.strip().splitlines()[-1]
    yield {"path": home, "env": env, "address": url}
    subprocess.run([sys.executable, "-c", "from pipelines import cluster; cluster.stop_local_head()"], env=env,
                   cwd=REPO, capture_output=True)


# Every `genpipe` a test starts, so that `end_started` can end what a failed test left running.
_started: list[subprocess.Popen] = []


def start(home: dict, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
    """Start the real CLI as a user's shell would: SIGINT at its default, whatever the suite inherited
    (a shell without job control starts background commands with SIGINT ignored, and exec keeps
    that: a test's Ctrl-C would never land), no stdin. stdout and stderr are pipes, as text."""
    proc = subprocess.Popen([GENPIPE, *args], env={**home["env"], **(extra_env or {})}, cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    _started.append(proc)
    return proc


def genpipe(home: dict, *args: str, timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI to its end; returns the completed process (stdout, stderr as text)."""
    proc = start(home, *args, extra_env=extra_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_started()  # as a user's Ctrl-C would: its stage job stops too, not just the driver
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def end_started() -> None:
    """End every `genpipe` this session started that still runs: SIGTERM first (the driver then stops its
    stage job and marks its runs KILLED), SIGKILL if it has not ended after 30 s. A test that fails
    half-way must not leave a job holding the head's CPUs for the tests after it."""
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def set_args(*fields: str) -> list[str]:
    """`--set FIELD` for each spec field override ("train.steps=20")."""
    return [a for f in fields for a in ("--set", f)]


def one_clear_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input's answer: exit 2 and one `genpipe: error:` line holding every needle, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("genpipe: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


def digest(root: Path) -> dict[str, str]:
    """Every file under root and its SHA-256: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# Digits (scikit-learn, 8x8) keeps a real pipeline to seconds of compute.
DIGITS = ["--set", "data.source=digits", "--set", "extractor.epochs=30", "--set", "evaluate.num_samples=300",
          "--set", "evaluate.grid_size=16"]


def sqlite_client(home: dict):
    """An MLflow client of a GENPIPE_HOME's sqlite database (tracking and registry)."""
    from mlflow.tracking import MlflowClient  # imported here: not every test run needs MLflow

    uri = f"sqlite:///{home['path'] / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def assert_registered(r: subprocess.CompletedProcess, home: dict, *, family: str, name: str, number: int,
                      steps: int) -> None:
    """A `genpipe pipeline` of FAMILY ended with version NUMBER of NAME: every stage run FINISHED, the
    steps all done, the family's primary metric and FID finite on the version and the evaluate run."""
    import math

    from gen_models import registry

    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["model"] == name and out["version"] == number
    assert f"step {steps}/{steps}" in r.stderr
    c = sqlite_client(home)
    for stage in ("train", "evaluate", "register"):
        assert c.get_run(out["runs"][stage]).info.status == "FINISHED", stage
    assert c.get_run(out["runs"]["train"]).data.metrics["train/img_per_s"] > 0
    version = c.get_model_version(name, str(number))
    assert version.run_id == out["runs"]["register"]
    tags = version.tags
    assert tags["family"] == family
    primary = registry.model_class(family).primary_metric[0]
    assert tags["primary_metric"] == primary
    assert math.isfinite(float(tags[f"metric.{primary}"])) and math.isfinite(float(tags["metric.fid"]))
    assert math.isfinite(c.get_run(out["runs"]["evaluate"]).data.metrics[f"eval/{primary}"])


def committed_checkpoint(train_dir: Path) -> bool:
    """Whether Ray Train has committed a checkpoint under a train stage's directory: it counts one only
    once its controller has written it into the manager snapshot; the files land earlier, and a run
    cut in between restarts from 0."""
    return committed_step(train_dir) > 0


def committed_step(train_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train has committed under a train stage's directory; 0: none."""
    step = 0
    for snapshot in train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except json.JSONDecodeError:  # caught mid-write
            continue
        if latest:
            step = max(step, int(latest["metrics"]["step"]))
    return step


# A local head's token (pipelines/cluster.py writes it where Ray's CLI and clients look for it).
LOCAL_TOKEN = Path.home() / ".ray" / "auth_token"


def ray_api(address: str, path: str, token: Path = LOCAL_TOKEN):
    """GET PATH from the Ray dashboard at ADDRESS, with the token: what `ray list` asks, in milliseconds.
    The CLI costs about 2 CPU-seconds a call, seconds of wall on a loaded VM, in which a run's last steps
    can pass before a test that polls it sees what it waits for."""
    req = urllib.request.Request(f"{address}{path}", headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def ray_state(address: str, resource: str, *filters: tuple[str, str, str], token: Path = LOCAL_TOKEN) -> list[dict]:
    """Ray's state API (`ray list RESOURCE --detail`): FILTERS are (key, "=" or "!=", value)."""
    query = urllib.parse.urlencode([("limit", "10000"), ("detail", "1"),
                                    *(pair for key, pred, value in filters
                                      for pair in (("filter_keys", key), ("filter_predicates", pred),
                                                   ("filter_values", value)))])
    return ray_api(address, f"/api/v0/{resource}?{query}", token)["data"]["result"]["result"]


def reserved_placement_groups(home: dict, *, within: float = 0, job_id: str | None = None) -> list[dict]:
    """The placement groups that still reserve resources on the session's head (those Ray job `job_id`
    created, when given), waiting up to `within` seconds for there to be none (Train's
    PlacementGroupCleaner, which frees the placement group of a stopped trial's workers, looks about once a
    second)."""
    deadline = time.monotonic() + within
    only = [("creator_job_id", "=", job_id)] if job_id else []
    while True:
        reserved = ray_state(home["address"], "placement_groups", ("state", "!=", "REMOVED"), *only)
        if not reserved or time.monotonic() > deadline:
            return reserved
        time.sleep(1)


_ORPHAN = """
import ray
from ray.util.placement_group import placement_group
ray.init()
@ray.remote(num_cpus=0)
class Holder:
    def hold(self):
        self.group = placement_group([{"CPU": 1}])
        ray.get(self.group.ready())
        return self.group.id.hex()
print("orphan", ray.get(Holder.options(lifetime="detached").remote().hold.remote()))
"""


def head_process(home: dict):
    """The session's local head: the `ray start` process, parent of its GCS, raylet and workers."""
    import psutil

    return psutil.Process(json.loads((home["path"] / "ray" / "head.json").read_text())["pid"])


def train_workers(home: dict) -> list:
    """The live Ray Train workers of the session's head (processes under its `ray start`), found in
    milliseconds: Ray's state CLI takes seconds under load, in which a run's last steps can pass."""
    import psutil

    workers = []
    for p in head_process(home).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                workers.append(p)
    return workers


def orphan_placement_group(home: dict) -> str:
    """Leave a placement group on the session's head in the state Ray's race leaves one in (a group created
    as its creator actor died): one CPU reserved, not detached, its creator job, named like a genpipe stage's,
    finished. The race cannot be timed from here, so a detached actor of that job holds the group instead
    (it stays on the head, idle and with no CPU, until the head stops). Returns the group's id."""
    ray = str(Path(sys.executable).with_name("ray"))
    r = subprocess.run([ray, "job", "submit", "--address", home["address"], "--submission-id",
                        f"genpipe-orphan-{secrets.token_hex(4)}", "--", sys.executable, "-c", _ORPHAN],
                       env={**home["env"], "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("orphan "))


# -- A cluster like the one in infra/k8s, on this machine: PostgreSQL, an MLflow server on it with
# -- basic auth and artifacts proxied to the moto S3, and a two-node Ray cluster with token auth.

# Distinctive, like the AWS ones: tests grep what a pipeline writes for them.
MLFLOW_USER, MLFLOW_PASSWORD = "genpipe", "gp-mlflow-pass-3e8a1c6f"
MLFLOW_ADMIN, MLFLOW_ADMIN_PASSWORD = "admin", "gp-mlflow-admin-9d2b7e41"
PG_PASSWORD = "gp-pg-pass-6c4f0a2e"
VENV_BIN = str(Path(sys.executable).parent)


def _wait(what: str, ready, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); log: {_tail(log)}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s; log: {_tail(log)}")
        time.sleep(0.25)


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else "-"


def _http_status(url: str, headers: dict | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything in its group."""
    for s, t in ((sig, wait), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        try:
            proc.wait(t)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the leader left behind
    except ProcessLookupError:
        pass


def _default_sigint() -> None:
    # A shell's background job inherits SIGINT ignored, and `ray start --block` stops on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pg_bindir() -> Path | None:
    """PostgreSQL's binaries: initdb on PATH, else the newest of Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return max(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if dirs else None


def _unprivileged() -> dict:
    """Popen arguments that drop root, which PostgreSQL refuses to run as; none when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):  # Debian's package creates `postgres`
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    pytest.skip("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


@contextmanager
def postgres(logs: Path, databases: tuple[str, ...]) -> Iterator[dict]:
    """PostgreSQL on 127.0.0.1 (a free port), user `mlflow` with PG_PASSWORD (scram), these databases."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs Debian's `postgresql` as root)")
    drop = _unprivileged()
    # Not under pytest's tmp dir: as root that is 0700 root's, which the user PostgreSQL runs as cannot enter.
    base = Path(tempfile.mkdtemp(prefix="genpipe-pg-"))
    proc = None
    try:
        pwfile = base / "pwfile"
        pwfile.write_text(PG_PASSWORD)
        if drop:
            for p in (base, pwfile):
                os.chown(p, drop["user"], drop["group"])
        subprocess.run([str(bindir / "initdb"), "-D", str(base / "data"), "-U", "mlflow", f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale", "-N"],
                       cwd=base, check=True, capture_output=True, **drop)
        port, log = _free_port(), logs / "postgres.log"
        # Only TCP on 127.0.0.1, the unix socket in its own dir; durability off: a test database.
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(base / "data"), "-h", "127.0.0.1",
                                     "-p", str(port), "-k", str(base), "-c", "fsync=off",
                                     "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                                    cwd=base, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **drop)
        env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
        createdb = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow"]
        _wait("PostgreSQL", lambda: subprocess.run([*createdb, databases[0]], env=env, capture_output=True,
                                                   check=False).returncode == 0, proc, log, 60)
        for db in databases[1:]:
            subprocess.run([*createdb, db], env=env, check=True, capture_output=True)
        yield {"host": "127.0.0.1", "port": port, "user": "mlflow", "password": PG_PASSWORD}
    finally:
        if proc is not None:
            _stop_group(proc, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


def start_mlflow_server(logs: Path, *, backend_uri: str, artifacts: str, env: dict, args: tuple = (),
                        port: int | None = None) -> dict:
    """`mlflow server` on 127.0.0.1 (a free port); returns {url, port, proc, log}: wait_mlflow, _stop_group."""
    port = port or _free_port()
    log = logs / f"mlflow-{port}.log"
    env = {**tracking.SERVER_ENV, **env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}  # uvicorn: PATH
    with open(log, "ab") as out:  # a server restarted on its port (a fault test) keeps the first one's log
        proc = subprocess.Popen([str(Path(VENV_BIN) / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
                                 "--workers", "1", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc, "log": log}


def wait_mlflow(server: dict, timeout: float = 240) -> None:
    _wait("mlflow server", lambda: _http_status(f"{server['url']}/health") == 200, server["proc"], server["log"],
          timeout)


class RayCluster:
    """Ray nodes on this machine, each `ray start --block` in its own session, token auth on.

    Every port with a fixed default gets a free one (two nodes, or two clusters, share the
    machine), each node has its own temp dir (as separate machines would), and stopping
    it is killing those sessions, never `ray stop` (which stops every Ray on the machine).
    """

    def __init__(self, logs: Path, env: dict, token_path: Path):
        self.logs, self.token_path = logs, token_path
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.gcs_port, dash_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{dash_port}"
        if not token_path.exists():
            token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
        env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                    # see pipelines/cluster.py: Train's cleaner finds the API server by this, not /tmp/ray
                    "RAY_API_SERVER_ADDRESS": self.address,
                    "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}  # jobs' `python` is this venv's

    def _start(self, name: str, args: list[str], num_cpus: int) -> None:
        # Short: Ray's unix sockets live under it, and a socket path has 107 bytes at most.
        temp_dir = tempfile.mkdtemp(prefix="genpipe-ray-")
        self.temp_dirs.append(temp_dir)
        ports = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
                 "dashboard-agent-listen-port", "metrics-export-port")
        cmd = [str(Path(VENV_BIN) / "ray"), "start", "--block", *args, "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--object-store-memory={200 * 2**20}", *(f"--{p}={_free_port()}" for p in ports)]
        with open(self.logs / f"ray-{name}.log", "wb") as out:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True,
                                               preexec_fn=_default_sigint))

    def start_head(self, num_cpus: int = 1) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=true",
                             f"--ray-client-server-port={_free_port()}"], num_cpus)

    def wait_head(self, timeout: float = 180) -> None:
        _wait("Ray head", lambda: _http_status(f"{self.address}/api/version") in (200, 401), self.procs[0],
              self.logs / "ray-head.log", timeout)

    def add_node(self, num_cpus: int = 1) -> None:
        # With a log monitor of its own (Ray's advice of one per machine is for nodes sharing a temp dir):
        # without it, what workers on this node print never reaches the job's log.
        self._start(f"node{len(self.procs)}", [f"--address=127.0.0.1:{self.gcs_port}"], num_cpus)

    def state(self, resource: str, **filters: str) -> list[dict]:
        return ray_state(self.address, resource, *((k, "=", v) for k, v in filters.items()), token=self.token_path)

    def jobs(self) -> list[dict]:
        """Every job submitted to the cluster, as its job API lists them (runtime_env included)."""
        return ray_api(self.address, "/api/jobs/", self.token_path)

    def wait_nodes(self, n: int, timeout: float = 180) -> list[dict]:
        def ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}); logs in {self.logs}")
            try:
                return len(self.state("nodes", state="ALIVE")) == n
            except OSError:
                return False

        _wait(f"{n} Ray nodes", ready, None, None, timeout)
        return self.state("nodes", state="ALIVE")

    def stop(self) -> None:
        for p in self.procs:  # all at once: `ray start --block` shuts its processes down on SIGINT
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for p in self.procs:
            _stop_group(p, signal.SIGINT, 20)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _timed(logs: Path, what: str, fn, *args) -> None:
    t0 = time.perf_counter()
    fn(*args)
    with open(logs / "times.txt", "a") as f:
        f.write(f"{what} in {time.perf_counter() - t0:.1f}s\n")


def _create_mlflow_user(url: str) -> None:
    body = json.dumps({"username": MLFLOW_USER, "password": MLFLOW_PASSWORD}).encode()
    admin = base64.b64encode(f"{MLFLOW_ADMIN}:{MLFLOW_ADMIN_PASSWORD}".encode()).decode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"})
    urllib.request.urlopen(req, timeout=30).close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_s3):
    """A cluster as infra/k8s deploys it, on this machine (module-scoped: it takes 20 to 50 s to come up).

    Everything listens on 127.0.0.1 only, but Ray's GCS and raylets: Ray 2.60 turns
    --node-ip-address=127.0.0.1 into the machine's address for a multi-node cluster.

    - PostgreSQL: databases `mlflow` (runs, registry) and `mlflow_auth` (MLflow's users);
    - `mlflow server` on it with `--app-name basic-auth`, `--allowed-hosts` 127.0.0.1:P and
      localhost:P, artifacts proxied (`--serve-artifacts`, the default) to s3://genpipe/mlflow-artifacts
      on the moto S3; user MLFLOW_USER with MLFLOW_PASSWORD;
    - Ray: a head and a second node, one CPU each, token auth (a token file of its own, not ~/.ray).
      Both nodes run with the S3 environment and MLflow credentials, as a Secret gives them in
      Kubernetes: stage jobs get neither from the driver.

    Yields a dict: `address` (the dashboard URL), `mlflow` (its URL), `ray` (the RayCluster),
    `env` (the environment for the CLI: S3, MLflow URI and credentials, the Ray token, GENPIPE_HOME),
    `node_ids`, `shard_cache` (where the nodes keep the S3 shards they train on), `seconds` (how long it
    took to come up).
    """
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("cluster")
    logs = tmp / "logs"
    logs.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_"))}
    with ExitStack() as stack:
        pg = stack.enter_context(postgres(logs, ("mlflow", "mlflow_auth")))
        db = f"postgresql://mlflow@127.0.0.1:{pg['port']}"  # no password in a URI: libpq reads PGPASSWORD
        ini = tmp / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {db}/mlflow_auth\n"
                       f"admin_username = {MLFLOW_ADMIN}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       # PBKDF2 on every request is CPU this machine does not have to spare
                       "auth_cache_ttl_seconds = 60\n")
        server_env = {**base, **moto_s3, "MLFLOW_S3_ENDPOINT_URL": moto_s3["AWS_ENDPOINT_URL"],
                      "PGPASSWORD": PG_PASSWORD, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_ADMIN_PASSWORD,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        port = _free_port()
        server = start_mlflow_server(logs, backend_uri=f"{db}/mlflow", artifacts="s3://genpipe/mlflow-artifacts",
                                     env=server_env, args=("--app-name", "basic-auth", "--allowed-hosts",
                                                           f"127.0.0.1:{port},localhost:{port}"), port=port)
        # SIGTERM, then SIGKILL after 3 s: `mlflow server` lingers 5 to 20 s after its uvicorn has gone
        stack.callback(_timed, logs, "mlflow server stopped", _stop_group, server["proc"], signal.SIGTERM, 3)

        shard_cache = tmp / "shard-cache"
        node_env = {**base, **moto_s3, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                    "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD, "GENPIPE_SHARD_CACHE": str(shard_cache)}
        ray = RayCluster(logs, node_env, tmp / "ray_auth_token")
        stack.callback(_timed, logs, "Ray stopped", ray.stop)
        ray.start_head()  # the server and the head come up side by side
        ray.wait_head()
        ray.add_node()
        wait_mlflow(server)
        _create_mlflow_user(server["url"])
        nodes = ray.wait_nodes(2)
        home = tmp / "genpipe-home"
        env = {**base, **moto_s3, "GENPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": server["url"],
               "MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
               "RAY_AUTH_TOKEN_PATH": str(ray.token_path)}
        up = time.perf_counter() - t0
        (logs / "times.txt").write_text(f"cluster up in {up:.1f}s\n")
        yield {"address": ray.address, "mlflow": server["url"], "mlflow_port": port, "ray": ray, "env": env,
               "home": home, "logs": logs, "pg": pg, "node_ids": sorted(n["node_id"] for n in nodes),
               "shard_cache": shard_cache, "seconds": up}
