"""What one Ray Train run costs before and after its training function: the fixed price every
train stage, search trial and fault restart pays.

    .venv/bin/python benchmarks/train_start.py            # 3 runs of 1 worker on a new local head
    .venv/bin/python benchmarks/train_start.py --runs 5 --workers 2

Starts a local head as `genpipe` does (a fresh GENPIPE_HOME), then times `TorchTrainer.fit()` of a
training function that only reports once: from `fit()` to the function's first line on rank 0, and from
its report to `fit()` returning. The first run pays Ray's own warm-up; the later ones are what a warm
head costs. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="genpipe-bench-"))
    os.environ["GENPIPE_HOME"] = str(home)
    from pipelines import cluster, ray_internals

    url = cluster.start_local_head(log=lambda m: None)
    try:
        # What a stage job's driver inherits from the head (a job's driver is where `fit` is called).
        os.environ.update({k: v for k, v in ray_internals.head_env(url).items() if k.startswith("RAY_")})
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        gcs = json.loads((home / "ray" / "head.json").read_text())["gcs_address"]
        ray.init(address=gcs, log_to_driver=False)
        ray_internals.poll_train_workers_often()  # as the train stage does
        marks = home / "marks"

        def train_fn(config):
            import time

            import ray.train

            started = time.time()
            ray.train.report({"step": 1})
            if ray.train.get_context().get_world_rank() == 0:
                Path(config["marks"]).write_text(json.dumps([started, time.time()]))

        for i in range(a.runs):
            t0 = time.time()
            TorchTrainer(train_fn, train_loop_config={"marks": str(marks)},
                         scaling_config=ScalingConfig(num_workers=a.workers),
                         run_config=RunConfig(name=f"probe-{i}", storage_path=str(home / "runs"))).fit()
            t1 = time.time()
            started, reported = json.loads(marks.read_text())
            print(json.dumps({"benchmark": "train_start", "run": i, "workers": a.workers,
                              "fit_s": round(t1 - t0, 2), "to_train_fn_s": round(started - t0, 2),
                              "after_report_s": round(t1 - reported, 2)}), flush=True)
    finally:
        cluster.stop_local_head()


if __name__ == "__main__":
    main()
