"""Prepare's extractor fit on one thread and on every core, on an idle machine and beside a busy core.

    .venv/bin/python benchmarks/extractor_threads.py     # about 5 minutes on 2 idle CPU cores

Fits the FID extractor as prepare does (`metrics.train_extractor`, Fashion-MNIST's 54,000 training images,
1 epoch as in jobs/smoke.yaml) in a fresh interpreter per row: on 1 thread, and on every core with
OpenMP's threads spinning while they wait (libgomp's default, OMP_WAIT_POLICY unset) or sleeping
(OMP_WAIT_POLICY=PASSIVE, what a local head's prepare runs with). Each row runs on the idle machine and
again beside a process that keeps one core busy, as prepare's fit shares the cores with the next stage's
job starting up or with other pipelines on the same head. Reports wall time and the CPU-seconds the fit
burned (what it takes from everything else on the machine). Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One fit, in the child: wall seconds and CPU-seconds (user + system) of the fit alone, as JSON.
FIT = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from pipelines import metrics
from pipelines.data import load_source
raw = load_source("fashion_mnist", None)
x, y = raw.x_train[:54000], raw.y_train[:54000]
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
metrics.train_extractor(x, y, num_classes=10, epochs=1, seed=0)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}))
"""
CORES = len(os.sched_getaffinity(0))
ROWS = [("1 thread", 1, None), (f"{CORES} threads, spinning", CORES, None),
        (f"{CORES} threads, sleeping (PASSIVE)", CORES, "PASSIVE")]


def fit(threads: int, wait_policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(ROOT)}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    out = subprocess.run([sys.executable, "-c", FIT, str(threads)], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    results = []
    for machine in ("idle", "one core busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if machine != "idle" else None
        try:
            for label, threads, policy in ROWS:
                results.append({"machine": machine, "fit": label, **fit(threads, policy)})
                print(f"{machine:14} {label:32} {results[-1]['wall_s']:6.1f} s  {results[-1]['cpu_s']:6.1f} CPU-s",
                      flush=True)
        finally:
            if spinner:
                spinner.kill()
    print(json.dumps({"benchmark": "extractor_threads", "cores": CORES, "results": results}))


if __name__ == "__main__":
    main()
