"""The stages, and what a stage's Ray job runs: `python -m pipelines.stages STAGE --spec URI ...`.

`TABLE` is the one list of stages: the module whose `stage(job)` does each
one's work, what its job imports before that work, and the spec sections its
key covers. A stage reads the spec and its input manifests by URI, does its
work, and ends by writing its own manifest (inputs, outputs, key, code
version, run id). The manifest is written last and atomically, so its
presence means the stage finished; the driver skips a stage whose manifest
carries the same key. This module imports no torch, MLflow or Ray at its top:
the CLI reads the table to build its commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import storage
from pipelines.errors import GateFailed, InvalidInput

if TYPE_CHECKING:
    from pipelines.config import PipelineSpec


@dataclass(frozen=True, kw_only=True)
class Stage:
    module: str
    """Exposes `stage(job: StageJob) -> dict`: the work, returning the manifest's outputs."""
    imports: tuple[str, ...] = ()
    """What its work imports beyond `module`. Both are imported before the work is timed, so the
    orchestration breakdown (benchmarks/orchestration.py) counts every import as start-up, not as work;
    a job submitted ahead of its turn imports them while the stage in front of it runs."""
    sections: tuple[str, ...]
    """The spec sections the stage's key covers, beyond the keys of the stages before it."""
    trains: bool = False
    """Starts Ray Train runs: before its work it connects to Ray (its module's `connect()`) and frees the
    placement groups that finished genpipe jobs left reserved
    (`ray_internals.free_placement_groups_of_finished_jobs`), so that its workers get the CPUs. A job
    submitted ahead of its turn does both while the stage in front of it runs."""
    all_cores: bool = False
    """Runs torch on every core of a local head (GENPIPE_STAGE_THREADS, set by `pipeline.run`) instead of
    the one thread Ray gives a job that reserves no CPUs, with OpenMP's threads sleeping when they wait
    (OMP_WAIT_POLICY=PASSIVE). Prepare's extractor fit shares the cores with the next stage's job
    starting up, or on a busy head with other pipelines: beside a busy core, spinning threads burned 2.7
    times the CPU of one thread and took twice as long, sleeping ones about the CPU of one thread
    (benchmarks/README.md, "Prepare's threads"). Evaluate's sampling, beside register's job starting up,
    ran 0.3 s slower on two threads: it keeps one."""


TABLE = {
    "prepare": Stage(module="pipelines.prepare", imports=("pipelines.data", "pipelines.metrics"),
                     sections=("data", "extractor", "seed"), all_cores=True),
    "train": Stage(module="pipelines.train", imports=("ray.train.v2.api.data_parallel_trainer",),
                   sections=("model", "train"), trains=True),
    "tune": Stage(module="pipelines.tune", imports=("mlflow.tracking", "ray.tune"),
                  sections=("model", "train", "tune"), trains=True),
    "evaluate": Stage(module="pipelines.evaluate", sections=("evaluate",)),
    "register": Stage(module="pipelines.register", imports=("mlflow", "mlflow.tracking"), sections=("registry",)),
}
STAGES = ("prepare", "train", "evaluate", "register")
"""A pipeline's stages in order; a spec with a search space (tune.space) runs tune in train's place."""


@dataclass(frozen=True, kw_only=True)
class StageJob:
    """What a stage's work is handed."""

    spec: PipelineSpec
    """The resolved spec; downstream of a search, with the best trial's values."""
    root: str
    """The storage root."""
    stage_dir: str
    """`{root}/{spec.name}/{stage}`: where the stage writes its outputs and manifest."""
    inputs: dict[str, dict]
    """Each earlier stage's manifest outputs, by stage; downstream of a search, "train" is the best trial."""
    runs: dict[str, str]
    """Each earlier stage's MLflow run id, by stage."""
    run_id: str
    """The MLflow run this stage logs into (its status is the driver's)."""
    key: str
    """The stage's cache key."""
    tracking_uri: str
    resume: bool
    """tune: continue an interrupted search."""


def code_version() -> str:
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{version('genpipe')}+{sha}" if sha else version("genpipe")


def read_json(uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise InvalidInput(f"{uri} is missing") from None
    except json.JSONDecodeError:
        raise InvalidInput(f"{uri} is not valid JSON (corrupt?)") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.stages")
    p.add_argument("stage", choices=tuple(TABLE))
    p.add_argument("--spec", required=True, help="URI of the resolved spec JSON")
    p.add_argument("--run-id", help="MLflow run this stage logs into")
    p.add_argument("--key", help="cache key recorded in the manifest")
    p.add_argument("--root", required=True, help="storage root")
    p.add_argument("--inputs", nargs="*", default=[], help="manifests of the earlier stages, in order")
    p.add_argument("--resume", action="store_true", help="tune: continue an interrupted search")
    p.add_argument("--outcome", help="where to record why the stage ended, when it ends on bad input (exit 2) or "
                                     "a missed quality gate (exit 3): the driver reads it, not the log")
    p.add_argument("--go", help="a job submitted ahead of its turn: the URI where the driver hands it the rest of "
                                "its arguments (--run-id, --key) when the stage before it has finished")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    threads = TABLE[a.stage].all_cores and os.environ.get("GENPIPE_STAGE_THREADS")
    if threads:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP below
    try:
        for module in (*TABLE[a.stage].imports, TABLE[a.stage].module):
            importlib.import_module(module)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if TABLE[a.stage].trains:
            _connect(importlib.import_module(TABLE[a.stage].module))
        ready_at = time.time()
        if a.go:
            a = p.parse_args([*argv, *wait_for_go(a.go)])
        if not (a.run_id and a.key):
            p.error("--run-id and --key are required (or --go)")
        return _run(a, ready_at=ready_at)
    except (InvalidInput, GateFailed) as e:
        print(f"genpipe: {'invalid input' if isinstance(e, InvalidInput) else 'quality gate not met'}: {e}",
              file=sys.stderr, flush=True)
        if a.outcome:
            _write_outcome(a.outcome, e)
        return e.exit_code


def _connect(module) -> None:
    from pipelines import ray_internals

    module.connect()
    try:
        freed = ray_internals.free_placement_groups_of_finished_jobs()
    except Exception as e:  # noqa: BLE001 -- the stage can still run; say what may hold its CPUs
        print(f"genpipe: could not check for placement groups that finished jobs left reserved: {e}",
              file=sys.stderr, flush=True)
    else:
        if freed:
            print(f"freed {freed} placement group(s) that finished jobs left reserved", flush=True)


def _write_outcome(uri: str, e: InvalidInput | GateFailed) -> None:
    try:
        storage.write_bytes(uri, json.dumps({"exit_code": e.exit_code, "message": str(e)}).encode())
    except Exception as err:  # the driver then goes by the exit code alone
        print(f"genpipe: could not record this outcome at {uri}: {err}", file=sys.stderr, flush=True)


def _process_started_at() -> float:
    """Wall-clock start of this process, so interpreter start-up and imports are counted (Linux)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


# How often a job that waits for its turn looks for its go file, and how long it waits for the driver's
# lease on it to move before it decides the driver is gone (killed, so nobody will start or stop it).
GO_POLL_S = 0.1
GO_ORPHANED_S = 60.0


def wait_for_go(uri: str) -> list[str]:
    """Block until the driver writes `{"args": [...]}` to URI; return those arguments.

    Until then the driver rewrites the file with a counter every few seconds (`{"lease": n}`); a
    counter that stops moving means the driver is gone, and the job ends rather than wait forever."""
    poll = GO_POLL_S if not storage.is_s3(uri) else 5 * GO_POLL_S  # a GET each time, on S3
    seen, moved_at = None, time.monotonic()
    while True:
        try:
            go = json.loads(storage.read_bytes(uri))
        except (FileNotFoundError, json.JSONDecodeError):
            go = None
        if go and "args" in go:
            return go["args"]
        if go != seen:
            seen, moved_at = go, time.monotonic()
        elif time.monotonic() - moved_at > GO_ORPHANED_S:
            print(f"genpipe: the driver that submitted this job stopped renewing {uri}: it is gone; ending",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        time.sleep(poll)


def _run(a: argparse.Namespace, *, ready_at: float) -> int:
    from pipelines.config import PipelineSpec
    from pipelines.tracking import tracking_uri

    timing = {"process_started_at": _process_started_at(), "ready_at": ready_at, "work_started_at": time.time()}

    spec = PipelineSpec.model_validate(read_json(a.spec))
    manifests = [read_json(uri) for uri in a.inputs]
    inputs = {m["stage"]: m["outputs"] for m in manifests}
    runs = {m["stage"]: m["run_id"] for m in manifests}
    if "tune" in inputs:
        # Downstream of a search the best trial is the training run: its spec, checkpoint and MLflow run.
        best = inputs["tune"]["best"]
        spec, inputs["train"], runs["train"] = spec.with_overrides(best["config"]), inputs["tune"], best["run_id"]
    job = StageJob(spec=spec, root=a.root, stage_dir=storage.join(a.root, spec.name, a.stage), inputs=inputs,
                   runs=runs, run_id=a.run_id, key=a.key, tracking_uri=tracking_uri(), resume=a.resume)
    outputs = importlib.import_module(TABLE[a.stage].module).stage(job)
    manifest = {"stage": a.stage, "key": a.key, "spec_hash": spec.hash(), "code_version": code_version(),
                "run_id": a.run_id, "inputs": a.inputs, "outputs": outputs,
                "timing": timing | {"finished_at": time.time()}}
    storage.write_bytes(storage.join(job.stage_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return 0


if __name__ == "__main__":
    rc = main()
    # By now the manifest is written and every MLflow call has returned. Tearing the interpreter down
    # (torch, mlflow, a Ray driver's shutdown) took 2 s a stage on the demo's machine, with nothing
    # left to save: exit at once. An uncaught exception still unwinds as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
