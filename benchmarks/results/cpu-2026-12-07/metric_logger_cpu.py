"""CPU-seconds a Train worker spends on `tracking.MetricLogger` (MLflow's import, the sqlite store, one report).

    .venv/bin/python benchmarks/results/cpu-2026-12-07/metric_logger_cpu.py

Torch is imported first, as a worker has it: only what the logger adds is counted.
"""

import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: F401


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


if __name__ == "__main__":
    import subprocess

    if len(sys.argv) == 1:  # the driver: a database with a run, then three fresh worker-like processes
        with tempfile.TemporaryDirectory() as d:
            uri = f"sqlite:///{d}/mlflow.db"
            code = (f"from mlflow.tracking import MlflowClient; c = MlflowClient({uri!r}); "
                    "print(c.create_run(c.create_experiment('x')).info.run_id)")
            run_id = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()[-1]
            for _ in range(3):
                subprocess.run([sys.executable, __file__, uri, run_id], check=True)
    else:
        from pipelines import tracking

        before = cpu()
        logger = tracking.MetricLogger(sys.argv[1], sys.argv[2], skip_logged=False)
        logger.log({"train/loss": 1.0, "train/img_per_s": 2.0}, 1)
        logger.flush()
        logger.close()
        print(f"MetricLogger: {cpu() - before:.2f} CPU-seconds")
