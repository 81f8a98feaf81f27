"""Where genpipe leans on Ray beyond its documented API, in one place, each with why.

Everything here was checked against one Ray version, the one pyproject.toml pins:
importing this module with another installed fails, so an upgrade starts by
re-checking each item below (and deleting what the new version makes needless).
"""

from __future__ import annotations

import os
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
    # keeps a single-node head on loopback only, which is all a local head is.
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


# -- Tune: a stopped trial's Train run is aborted before Tune removes the trial's placement group.
#
# Right after a trial's `stop` (an ASHA cut, a PBT exploit or pause, the time budget, the end of the
# search) Tune removes the trial's placement group, and Ray destroys every actor in it: the trial's Train
# controller too, without shutting its workers down. Ray 2.60's PlacementGroupCleaner (ray PR #58515, for
# ray issue #54305) then frees the workers' placement group once it sees the controller gone. Measured
# here on 2026-12-05 with the abort below deleted: the ASHA and PBT tests pass (no placement group left
# reserved within 30 s), but the PBT search took 144 s against 113 s with it, on a less loaded machine:
# every paused trial waits for the cleaner's next look. So the abort stays: what Train's own Ctrl-C
# handler does, through the controller's `abort` (not a public method), reached through a controller
# callback (a private class; Train hands RunConfig callbacks that are not UserCallbacks to the controller
# as they are, "so custom workarounds built on internal callbacks work") and Tune's `__mixins__` hook
# on function trainables. A cooperative stop (the trial's cleanup tells `train_loop` to return, so
# `fit()` ends normally) would need only public APIs; it is not built yet.

trial_controller = None
"""The Train controller of the trial running in this process (a trial actor runs one trial at a time)."""


def announce_controller(queue):
    """A Train controller callback that puts ("controller", the controller's actor handle) on `queue`."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class AnnounceController(ControllerCallback):
        def after_controller_start(self, train_run_context):
            queue.put(("controller", ray.get_runtime_context().current_actor))

    return AnnounceController()


class AbortTrainRunOnStop:
    """Mixed into a trial's Tune trainable: its cleanup aborts the trial's Train run (`trial_controller`)
    before Tune goes on: the controller shuts its workers down and removes their placement group."""

    def cleanup(self):
        global trial_controller
        if trial_controller is not None:
            import ray

            try:
                ray.get(trial_controller.abort.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # abort ends the controller's process, so the call never returns a value
            trial_controller = None
        super().cleanup()


def abort_train_run_on_stop(trainable) -> None:
    """Give a function trainable (`tune.with_parameters(...)`) the AbortTrainRunOnStop cleanup."""
    trainable.__mixins__ = (AbortTrainRunOnStop,)  # Tune's hook for adding to a function trainable's class
