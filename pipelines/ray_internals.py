"""Where genpipe leans on Ray beyond its documented API, in one place, each with why.

Everything here was checked against one Ray version, the one pyproject.toml pins:
importing this module with another installed fails, so an upgrade starts by
re-checking each item below (and deleting what the new version makes needless), and
`pipelines/torch_backend.py`, Train's torch backend rewritten so that its controller imports no
torch, which imports this module for the same check.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from importlib.metadata import version

RAY_VERSION = "2.60.0"
if version("ray") != RAY_VERSION:
    raise ImportError(f"genpipe is checked against ray {RAY_VERSION} (pyproject.toml pins it), not the installed "
                      f"{version('ray')}: re-check {__file__} before moving the pin")


def head_env(api_server_url: str) -> dict[str, str]:
    """The environment a local head is started with (`ray start --head`); its processes, and so every job
    and worker on it, inherit it."""
    env = dict(os.environ)
    # Token auth on a local head, as on a cluster: read by Ray's CLI and clients at import.
    env.setdefault("RAY_AUTH_MODE", "token")
    # On Linux Ray swaps --node-ip-address=127.0.0.1 for the machine's address and its GCS, raylet
    # and agents listen on every interface. This switch (meant for laptops: no multi-node cluster)
    # keeps a single-node head on loopback only, which is all a local head is. (Ray calls the swap
    # intended: ray issue #26293. A loopback mode for single-node heads on Linux would retire this.)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Train's PreemptionWatcher polls for nodes being drained (spot instances). A local head is one
    # machine that is never drained, and the watcher is one more Python process booting on its cores
    # just as the first training steps run.
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's state API, called inside the cluster with no address (Train's PlacementGroupCleaner asks it
    # whether its controller is alive), finds the cluster through /tmp/ray, which names the newest head
    # in the default temp dir, not this one: it then waits 40 s for an absent GCS, and every Train run
    # paid its stop timeout for it. Name this head's API server outright.
    env["RAY_API_SERVER_ADDRESS"] = api_server_url
    return env


def poll_train_workers_often() -> None:
    """Make Train's controller poll its workers every 0.25 s: call before `TorchTrainer.fit`, which hands
    the variable on to the controller; a value already in the environment wins.

    The controller takes a report off a worker's one-slot result queue only when it polls the workers,
    every 2 s by default: a worker that reports more often than that blocks in each `ray.train.report`
    until the next poll (1.6 s a report on the smoke spec), and the end of a run is seen up to 2 s late.
    A poll is one small actor call per worker."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def time_out_train_barriers(timeout_s: float) -> None:
    """Give Ray Train's own barrier the timeout the process group's collectives have: call before
    `TorchTrainer.fit`, which hands the variable on to the controller; a value already in the environment
    wins.

    Every `ray.train.report` waits there for all ranks, and Ray leaves it without a timeout: a peer frozen
    between its last all-reduce and its report would hold the others until the controller's health check
    gives up on it, 10 minutes later, however short `train.collective_timeout_s` is."""
    os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", str(timeout_s))


def free_placement_groups_left_by(job_id: str, *, wait_s: float = 30.0) -> int:
    """Remove the placement groups that job `job_id` created and that still reserve resources, once its
    Train runs are over: waits up to `wait_s` for Train to free them itself first. Returns how many it
    removed.

    Train's controller registers each worker group's placement group with a detached
    PlacementGroupCleaner, which removes it if the controller dies. A controller that dies while it
    restarts its worker group, after creating the new group's placement group and before registering it,
    leaves that one to nobody: it stays reserved until the head stops. A search makes that window
    likely: at its end Tune kills every trial's actor, and with it a Train run that was restarting
    (seen once in the PBT test, a worker's health check failing under load just before the end). Only
    called when the job's searches are over, so a placement group it still owns has no run to serve.
    (Registering the group with the cleaner before creating it, in Train, would retire this.)"""
    from ray.util.state import list_placement_groups

    def reserved() -> list:
        return list_placement_groups(filters=[("creator_job_id", "=", job_id), ("state", "!=", "REMOVED")],
                                     limit=10_000, raise_on_missing_output=False)

    deadline = time.monotonic() + wait_s
    while (left := reserved()) and time.monotonic() < deadline:
        time.sleep(1)
    _remove([pg.placement_group_id for pg in left])
    return len(left)


# A finished job's status (Ray's JobStatus, the terminal ones).
FINISHED = ("STOPPED", "SUCCEEDED", "FAILED")


def orphaned_placement_groups(groups: list[dict], jobs: list[dict]) -> list[str]:
    """The ids of the placement groups (Ray state API rows, with detail) that still reserve resources for
    a genpipe stage job that has finished. Ray removes a group that is not detached once its creator job and
    creator actor have both died, so for genpipe's jobs, whose actors hold no groups past their job, every one
    of these is one Ray missed (see `free_placement_groups_of_finished_jobs`). Other jobs' groups are left
    alone: on a shared cluster a detached actor (Serve's controller, say) holds groups past its job's end."""
    finished = {j["job_id"] for j in jobs
                if j["status"] in FINISHED and (j["submission_id"] or "").startswith("genpipe-")}
    return [g["placement_group_id"] for g in groups
            if g["state"] != "REMOVED" and not g["is_detached"] and g["creator_job_id"] in finished]


def free_placement_groups_of_finished_jobs() -> int:
    """Remove the placement groups that finished genpipe jobs left reserved; returns how many. The stages that
    start Train runs call it once connected, before their work, so a group an earlier, stopped job left
    cannot hold the CPUs their workers wait for.

    A group's creation can reach the GCS after the actor that asked for it has died: Ray then never sees
    both of its owners die, and the group stays reserved until the head stops. Seen once in the suite: a
    search stopped (its job's driver got SIGTERM) just as a trial's Train controller started a worker
    group; its placement group was created 0.4 s before the job was marked finished and still reserved a
    CPU two minutes later. A stopped train stage, which runs without a PlacementGroupCleaner
    (`torch_trainer`), hit it once too, before its driver ended its controller first (`controller_dies_first`)."""
    from ray.util.state import list_jobs, list_placement_groups

    groups = list_placement_groups(filters=[("state", "!=", "REMOVED")], detail=True, limit=10_000,
                                   raise_on_missing_output=False)
    if not groups:
        return 0
    jobs = [{"job_id": j.job_id, "submission_id": j.submission_id, "status": getattr(j.status, "value", j.status)}
            for j in list_jobs(limit=10_000, raise_on_missing_output=False)]
    orphans = orphaned_placement_groups([vars(g) for g in groups], jobs)
    _remove(orphans)
    return len(orphans)


def _remove(placement_group_ids: list[str]) -> None:
    """Remove placement groups by the hex ids the state API gives (the calling process is a Ray driver)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in placement_group_ids:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def torch_trainer(*, in_search: bool, torch_config, **kwargs):
    """`TorchTrainer(torch_config=torch_config, **kwargs)` without two of Train's default callbacks that cost
    every run time and CPU and do nothing for genpipe's. On a warm 2-core head, a 2-worker `fit()` of a
    function that only reports took 10.3 s and 17.1 s of the machine's CPU with them, 8.0 s and 12.7 s
    without (benchmarks/train_start.py: benchmarks/README.md#the-test-suite).

    - DatasetsCallback, always: it starts a DatasetManager actor (a process importing Ray Data) and ships
      Ray Data's context to every worker, datasets or none. genpipe's workers read their own shards.
    - PlacementGroupCleanerCallback, outside a search: a detached actor per run that asks the state API
      every second whether the controller lives, to free the workers' placement group if it dies while
      `fit()`'s caller lives on. A train stage's caller is its job's driver, which fails with the
      controller (or, stopped, kills it first: `controller_dies_first`), and Ray frees a finished job's
      placement groups. A search's trial is not: Tune goes on
      after stopping it, so there the cleaner stays (with `free_placement_groups_left_by` for its gap).

    Built on `DataParallelTrainer`, which `TorchTrainer` only extends with a default torch config and a
    local mode (no workers) that genpipe does not use: `ray.train.torch` imports torch, and the train
    stage's job, a driver that only starts the run, need not (pipelines/train.py)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    unused = (DatasetsCallback,) if in_search else (DatasetsCallback, PlacementGroupCleanerCallback)

    class Trainer(DataParallelTrainer):
        controller = None  # the run's TrainController actor, once fit() has started it (main thread only)

        def _create_default_callbacks(self) -> list:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

        def _register_sigint_handler(self, controller) -> None:
            # fit() hands the controller only to this hook (called on the main thread): kept for
            # `controller_dies_first`.
            self.controller = controller
            super()._register_sigint_handler(controller)

    return Trainer(backend_config=torch_config, **kwargs)


# How long a stopped train stage's driver waits for its Train controller's death before its own: inside
# the 3 s Ray gives a stopped job's driver before it SIGKILLs it (RAY_JOB_STOP_WAIT_TIME_S). Past them,
# no harm: the controller is dead by then, and only the driver's own exit is cut short.
CONTROLLER_DEATH_WAIT_S = 2.0


@contextmanager
def controller_dies_first(trainer):
    """Within the block (a `trainer.fit()` of `torch_trainer`'s), SIGTERM kills the run's Train controller
    and waits until Ray has seen it die, then goes on to the handler it replaced (in a stage job, the one
    `ray.init()` installs, which exits).

    A train stage's job is stopped with SIGTERM to its driver, which exited on it at once. Its controller
    lived on for ~150 ms, until Ray saw its owner gone, and a controller whose worker group was still
    starting answered the failed start with a new placement group, created after Ray had freed the
    finished job's groups: that one stayed reserved until the next train job freed it, 45 s later
    (benchmarks/results/cpu-2026-12-07/NOTES.md). With the controller's process dead first, every group
    it made exists before the job ends, and Ray frees them with the job.

    SIGKILL to its process, not Train's abort (what its Ctrl-C handler calls), which waits on the
    controller's event loop, blocked for seconds by a starting worker group; nor `ray.kill`, after which
    Ray calls the actor dead while its process, still running, exits (0.5 s on the 2-core VM).
    `fit()` places the controller on its driver's node, so the driver can signal it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers are the main thread's; a search's trials have a PlacementGroupCleaner
        return

    def on_sigterm(signum, frame):
        try:
            if trainer.controller is not None:
                print("genpipe: stopped: ending the Train run's controller first (its process is killed)",
                      flush=True)
                _kill_and_wait(trainer.controller, CONTROLLER_DEATH_WAIT_S)
        except Exception as e:  # noqa: BLE001 -- the stop goes on; the next train job frees what is left
            print(f"genpipe: could not end the Train run's controller first: {e}", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGTERM, old)
            signal.raise_signal(signal.SIGTERM)

    old = signal.getsignal(signal.SIGTERM)
    if old is None:  # a handler set outside Python: the default is the nearest
        old = signal.SIG_DFL
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _kill_and_wait(actor, timeout_s: float) -> None:
    """SIGKILL ACTOR's process if it runs on this node (`ray.kill` it otherwise), and wait, at most
    TIMEOUT_S, until calls to it fail: Ray has seen it die."""
    import ray
    from ray._private import state

    deadline = time.monotonic() + timeout_s
    info = state.actors(actor_id=actor._actor_id.hex()) or {}
    alive_here = info.get("State") == "ALIVE" and info.get("Pid") and \
        info.get("Address", {}).get("NodeID") == ray.get_runtime_context().get_node_id()
    try:
        if alive_here:
            os.kill(info["Pid"], signal.SIGKILL)
        else:  # not started yet (Ray cancels its creation), elsewhere, or dead (its pid may be reused)
            ray.kill(actor, no_restart=True)
    except ProcessLookupError:
        pass  # already gone
    while (left := deadline - time.monotonic()) > 0:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=left)
        except ray.exceptions.ActorDiedError:
            return
        except ray.exceptions.ActorUnavailableError:
            pass  # its connection is gone, but Ray has not yet called it dead
        except ray.exceptions.GetTimeoutError:
            return
        time.sleep(0.05)
