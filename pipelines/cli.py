"""`genpipe`: run pipelines and stages, sample registered models, browse the registry.

Exit codes: 0 done, 1 a failure (a stage's log tail is shown), 2 invalid
input (one line, no traceback), 3 a quality gate not met, 130 interrupted.
Heavy imports (torch, ray, mlflow) happen inside the commands, so `--help`
and spec errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from pipelines import models
from pipelines.errors import GateFailed, InvalidInput, StageFailed
from pipelines.stages import STAGES


def _spec(a: argparse.Namespace):
    from pipelines import config

    return config.load(a.config, a.set or [])


def cmd_pipeline(a: argparse.Namespace) -> int:
    from pipelines import pipeline

    spec = _spec(a)
    result = pipeline.run(spec, until=a.until, address=a.address, resume=getattr(a, "resume", False))
    print(json.dumps(result), flush=True)
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    out = Path(a.out)
    if out.suffix not in (".png", ".npy"):
        raise InvalidInput(f"--out {out}: must end in .png (a grid) or .npy (uint8 N,C,H,W)")
    if not out.parent.is_dir():
        raise InvalidInput(f"--out {out}: directory {out.parent} does not exist")
    if a.n < 1:
        raise InvalidInput(f"-n {a.n}: the number of images must be at least 1")
    import pandas as pd

    from pipelines import sampling, serving

    if not 0 <= a.seed <= serving.MAX_SEED:
        raise InvalidInput(f"--seed {a.seed}: must be in [0, 2^63)")
    pyfunc = _load_pyfunc(a.model_uri)
    model = pyfunc.unwrap_python_model().model
    if a.label is not None and (why := serving.label_error(model, a.label)):
        raise InvalidInput(f"--label {a.label}: {why}")
    label = {} if a.label is None else {"label": a.label}
    images = sampling.draw(lambda n, seed: pyfunc.predict(pd.DataFrame([{"n": n, "seed": seed, **label}])),
                           model, a.n, a.seed)
    if out.suffix == ".npy":
        sampling.write_npy(out, a.n, images)
    else:
        import torch

        from pipelines.evaluate import grid_png

        out.write_bytes(grid_png(torch.from_numpy(np.concatenate(list(images))).float() / 255))
    print(f"wrote {a.n} samples to {out}", file=sys.stderr)
    return 0


def _load_pyfunc(uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise InvalidInput(f"cannot load {uri}: {str(e).splitlines()[0]}") from None


def cmd_head_status(a: argparse.Namespace) -> int:
    from pipelines import cluster
    from pipelines.tracking import genpipe_home

    url = cluster.local_head_url()
    if url is None:
        print(f"no local Ray head is up for GENPIPE_HOME={genpipe_home()}")
        return 0
    jobs = cluster.running_jobs(url)
    print(f"local Ray head at {url} (GENPIPE_HOME={genpipe_home()}); "
          f"{len(jobs)} job(s) running{': ' + ', '.join(jobs) if jobs else ''}")
    return 0


def cmd_head_stop(a: argparse.Namespace) -> int:
    from pipelines import cluster
    from pipelines.tracking import genpipe_home

    url = cluster.local_head_url()
    jobs = cluster.running_jobs(url) if url else []
    if jobs and not a.force:
        raise InvalidInput(f"the local Ray head at {url} is running {len(jobs)} job(s) ({', '.join(jobs)}); "
                           "stopping it would fail them: wait for them, or pass --force")
    if cluster.stop_local_head():
        print(f"stopped the local Ray head{f' at {url}' if url else ''}", file=sys.stderr)
    else:
        print(f"no local Ray head to stop for GENPIPE_HOME={genpipe_home()}", file=sys.stderr)
    return 0


def cmd_ui(a: argparse.Namespace) -> int:
    from pipelines import tracking

    uri = tracking.tracking_uri()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri,
           "--host", a.host, "--port", str(a.port)]
    print(f"MLflow UI on http://{a.host}:{a.port} (tracking {uri})", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env={**tracking.SERVER_ENV, **os.environ})  # a user's own setting wins


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genpipe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def spec_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help="job spec YAML (jobs/*.yaml); defaults apply when omitted")
        sp.add_argument("--set", action="append", metavar="KEY.SUB=VALUE", help="override a spec field; repeatable")
        sp.add_argument("--address", help="Ray dashboard URL (default: RAY_ADDRESS, else a local head on 127.0.0.1)")

    sp = sub.add_parser("pipeline", help="prepare -> train -> evaluate -> register, each a Ray job")
    spec_args(sp)
    sp.add_argument("--resume", action="store_true", help="continue an interrupted search (tune stage)")
    sp.set_defaults(fn=cmd_pipeline, until="register")
    sp = sub.add_parser("tune", help="prepare -> tune: a Ray Tune search, every trial a DDP run and an MLflow run")
    spec_args(sp)
    sp.add_argument("--resume", action="store_true", help="continue an interrupted search")
    sp.set_defaults(fn=cmd_pipeline, until="tune")
    for stage in STAGES:
        sp = sub.add_parser(stage, help=f"run the pipeline up to {stage} (earlier stages run if not cached)")
        spec_args(sp)
        sp.set_defaults(fn=cmd_pipeline, until=stage)

    sp = sub.add_parser("sample", help="draw samples from a registered model")
    sp.add_argument("model_uri", help="e.g. models:/NAME@champion or models:/NAME/3")
    sp.add_argument("-n", type=int, default=64, help="number of images, any: drawn as several server-sized requests")
    sp.add_argument("--out", required=True, help="grid.png or samples.npy (uint8 N,C,H,W)")
    sp.add_argument("--seed", type=int, default=0, help="in [0, 2^63); the same n and seed give the same images")
    sp.add_argument("--label", type=int, default=None, help="class label, for conditional families only")
    sp.set_defaults(fn=cmd_sample)

    sp = sub.add_parser("models", help="the model registry")
    models.add_commands(sp.add_subparsers(dest="models_command", required=True))

    sp = sub.add_parser("head", help="the local Ray head that pipelines on this GENPIPE_HOME share")
    head = sp.add_subparsers(dest="head_command", required=True)
    head.add_parser("status", help="whether it is up, where, and its running jobs").set_defaults(fn=cmd_head_status)
    hp = head.add_parser("stop", help="stop it (refused while jobs run, unless --force)")
    hp.add_argument("--force", action="store_true", help="stop it even though jobs are running on it")
    hp.set_defaults(fn=cmd_head_stop)

    sp = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5000)
    sp.set_defaults(fn=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from pipelines.tracking import Terminated

    try:
        return a.fn(a)
    except InvalidInput as e:
        print(f"genpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except GateFailed as e:
        print(f"genpipe: quality gate not met: {e}", file=sys.stderr)
        return e.exit_code
    except StageFailed as e:
        print(f"genpipe: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Terminated):
        print("genpipe: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from pipelines.tracking import refusal

        why = refusal(e)  # a server with auth turning us away is bad input, not a crash
        if why is None:
            raise
        print(f"genpipe: error: {why}", file=sys.stderr)
        return InvalidInput.exit_code


def console_main() -> None:
    """The `genpipe` script: `main`, then exit without tearing the interpreter down.

    Every write has returned by then (runs ended, manifests written, the result printed); unloading
    torch, MLflow and Ray took 1.5 s after a pipeline's last line. An uncaught exception still
    unwinds and prints its traceback as usual."""
    rc = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    console_main()
