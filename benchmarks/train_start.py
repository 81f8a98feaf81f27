"""What one Ray Train run costs before and after its training function: the fixed price every
train stage, search trial and fault restart pays.

    .venv/bin/python benchmarks/train_start.py            # 3 runs of 1 worker on a new local head
    .venv/bin/python benchmarks/train_start.py --runs 4 --workers 2 --trainer stock   # Train's own defaults

Starts a local head as `genpipe` does (a fresh GENPIPE_HOME), then times `TorchTrainer.fit()` of a
training function that only reports once: from `fit()` to the function's first line on rank 0, and from
its report to `fit()` returning, and the CPU seconds the whole machine spent over the `fit()` (from
/proc/stat: run it on an otherwise idle machine). The first run pays Ray's own warm-up; the later ones
are what a warm head costs. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path


def busy_cpu_s() -> float:
    """CPU seconds this machine has spent outside idle and iowait since boot (Linux)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--trainer", choices=("stage", "trial", "stock"), default="stage",
                   help="the train stage's TorchTrainer, a search trial's, or Train's own with every default callback")
    p.add_argument("--ray-torch-config", action="store_true",
                   help="Ray's TorchConfig (the controller imports torch), not genpipe's (pipelines/torch_backend.py)")
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

        from pipelines import torch_backend

        torch_config = (ray.train.torch.TorchConfig if a.ray_torch_config else torch_backend.TorchConfig)(
            backend="gloo", timeout_s=1800)
        trainer = (TorchTrainer if a.trainer == "stock"
                   else functools.partial(ray_internals.torch_trainer, in_search=a.trainer == "trial"))
        for i in range(a.runs):
            t0, cpu0 = time.time(), busy_cpu_s()
            trainer(train_loop_per_worker=train_fn, train_loop_config={"marks": str(marks)}, torch_config=torch_config,
                    scaling_config=ScalingConfig(num_workers=a.workers),
                    run_config=RunConfig(name=f"probe-{i}", storage_path=str(home / "runs"))).fit()
            t1, cpu1 = time.time(), busy_cpu_s()
            started, reported = json.loads(marks.read_text())
            print(json.dumps({"benchmark": "train_start", "trainer": a.trainer,
                              "torch_config": "ray" if a.ray_torch_config else "genpipe", "run": i, "workers": a.workers,
                              "fit_s": round(t1 - t0, 2), "to_train_fn_s": round(started - t0, 2),
                              "after_report_s": round(t1 - reported, 2), "cpu_s": round(cpu1 - cpu0, 1)}), flush=True)
    finally:
        cluster.stop_local_head()


if __name__ == "__main__":
    main()
