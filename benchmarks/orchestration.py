"""Where a pipeline's wall time goes: Ray head start, job submission and start-up,
each stage's work, Ray Train's own start, checkpoints and MLflow logging.

    .venv/bin/python benchmarks/orchestration.py                       # jobs/demo.yaml, a fresh GENPIPE_HOME
    .venv/bin/python benchmarks/orchestration.py --set train.num_workers=1
    .venv/bin/python benchmarks/orchestration.py --config jobs/smoke.yaml --warm   # then again on the warm head

Runs `genpipe pipeline` as a user would, in a fresh GENPIPE_HOME (so the local
Ray head is started, and every stage runs: nothing cached), then reads the
stages' manifests (process start, work start, finish) and the train run's
`train/img_per_s` history from MLflow. "Compute" is what a bare script would
also spend: prepare's work (shards, extractor), the training steps themselves,
evaluate's sampling and metrics, register's packaging. Everything else is
orchestration overhead (the data path has its own benchmark, data_path.py).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="jobs/demo.yaml")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    p.add_argument("--warm", action="store_true",
                   help="then run it again under another name on the same head, nothing cached, and report both")
    a = p.parse_args()

    from pipelines.cluster import stop_local_head
    from pipelines.config import load

    home = Path(tempfile.mkdtemp(prefix="genpipe-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["GENPIPE_HOME"] = str(home)
    os.environ["GENPIPE_HOME"] = str(home)
    try:
        # Under another name and with another shard size: the data must be prepared again (pipelines on the
        # same data share one prepare), and its extractor is found by the data's content hash.
        spec = load(REPO / a.config, a.sets)
        warm = [*a.sets, f"name={spec.name}-warm", f"data.shard_size={spec.data.shard_size - 1}"]
        for run, sets in [("cold", a.sets), *([("warm", warm)] if a.warm else [])]:
            print(f"== {run} head: {a.config} {' '.join(sets)}")
            measure(home, env, a.config, sets, run)
    finally:
        stop_local_head()


def measure(home: Path, env: dict, config: str, sets: list[str], run: str) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.config import load

    spec = load(REPO / config, sets)
    cmd = [str(Path(sys.executable).parent / "genpipe"), "pipeline", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    t_end = time.time()
    if r.returncode != 0:
        sys.exit(f"pipeline failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])

    root = home / "storage" / spec.name
    stages = ["prepare", "train", "evaluate", "register"]
    t = {s: json.loads((root / s / "manifest.json").read_text())["timing"] for s in stages}

    # The training steps alone: each logged window is log_every steps at img_per_s.
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    history = sorted(client.get_metric_history(result["runs"]["train"], "train/img_per_s"), key=lambda m: m.step)
    steps_done, loop_s = 0, 0.0
    for m in history:
        loop_s += (m.step - steps_done) * spec.train.batch_size / m.value
        steps_done = m.step

    peak = client.get_metric_history(result["runs"]["train"], "train/peak_mem_mib")
    peak_mib = max((m.value for m in peak), default=float("nan"))

    work = {s: t[s]["finished_at"] - t[s]["work_started_at"] for s in stages}
    # A stage job submitted ahead of its turn starts up while the stage in front of it runs: only the part
    # of its start-up (process start to imports done, `ready_at`) that is still going on once that stage
    # has finished is on the critical path. The rest of the gap between two stages is the hand-over:
    # the driver seeing the manifest, opening the MLflow run, and the go (or a submission).
    ready = {s: t[s].get("ready_at", t[s]["work_started_at"]) for s in stages}
    startup = {"prepare": ready["prepare"] - t["prepare"]["process_started_at"]}
    handover = {}
    for before, s in zip(stages, stages[1:]):
        startup[s] = max(0.0, ready[s] - max(t[s]["process_started_at"], t[before]["finished_at"]))
        handover[s] = t[s]["work_started_at"] - t[before]["finished_at"] - startup[s]
    hidden = sum(ready[s] - t[s]["process_started_at"] for s in stages) - sum(startup.values())
    parts = {
        "driver start + Ray head + first submission": t["prepare"]["process_started_at"] - t0,
        "between stages (manifest, MLflow run, go or submission)": sum(handover.values()),
        "stage start-up not hidden (interpreter, imports)": sum(startup.values()),
        "prepare: shards, extractor, reference stats": work["prepare"],
        "train: the training steps": loop_s,
        "train: Ray Train start, reports, checkpoints, logging": work["train"] - loop_s,
        "evaluate: sampling and metrics": work["evaluate"],
        "register: pyfunc, registry, card": work["register"],
        "after the last stage (driver exit)": t_end - t["register"]["finished_at"],
    }
    compute = {"prepare: shards, extractor, reference stats", "train: the training steps",
               "evaluate: sampling and metrics", "register: pyfunc, registry, card"}
    wall = t_end - t0
    overhead = sum(v for k, v in parts.items() if k not in compute)
    print(f"{'part':58} {'s':>7} {'share':>6}")
    for k, v in parts.items():
        print(f"{k:58} {v:7.1f} {v / wall:6.1%}{'' if k in compute else '  overhead'}")
    print(f"{'total':58} {wall:7.1f}   overhead {overhead:.1f} s = {overhead / wall:.1%}")
    img_per_s = steps_done * spec.train.batch_size / loop_s if loop_s else 0.0
    print(f"stage start-up hidden behind the stage in front (jobs submitted ahead of their turn): {hidden:.1f} s")
    print(f"train: {img_per_s:.0f} img/s over {steps_done} steps; peak memory per worker {peak_mib:.0f} MiB")
    print(json.dumps({"benchmark": "orchestration", "config": config, "sets": sets, "head": run, "wall_s": round(wall, 1),
                      "overhead_s": round(overhead, 1), "overhead_share": round(overhead / wall, 3),
                      "startup_hidden_s": round(hidden, 1),
                      "train_img_per_s": round(img_per_s, 1),
                      "peak_mem_mib_per_worker": round(peak_mib, 1),
                      "metrics": result.get("metrics", {}),
                      "parts": {k: round(v, 2) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
