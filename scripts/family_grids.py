"""The README's sample grids: for each family, the CPU command its job spec
documents, then 16 samples of the model version that run registered.

    .venv/bin/python scripts/family_grids.py [FAMILY ...]     # every family when none

It runs in $GENPIPE_HOME like any genpipe command and writes
docs/samples/<family>.png, plus <family>.json with the command, its metrics and
its wall time, so the README's numbers point at the run that drew the grid.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from gen_models import registry

REPO = Path(__file__).resolve().parents[1]
GENPIPE = str(Path(sys.executable).with_name("genpipe"))
OUT = REPO / "docs" / "samples"


def cpu_command(spec: Path) -> list[str]:
    """The arguments after `genpipe` of the CPU command in a job spec's header comment."""
    lines = iter(line.removeprefix("#").strip() for line in spec.read_text().splitlines() if line.startswith("#"))
    for line in lines:
        if line.startswith("genpipe pipeline"):
            command = line
            while command.endswith("\\"):
                command = command[:-1] + next(lines, "")
            return shlex.split(command)[1:]
    raise ValueError(f"{spec}: no `genpipe pipeline` command in its header comment")


def draw(family: str) -> dict:
    args = cpu_command(REPO / "jobs" / f"{family}.yaml")
    t0 = time.perf_counter()
    # stderr (the stages' progress) goes to the terminal; the last stdout line is the result.
    done = subprocess.run([GENPIPE, *args], stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return grid(family, args, f"models:/{result['model']}/{result['version']}", result["metrics"],
                time.perf_counter() - t0)


def grid(family: str, args: list[str], uri: str, metrics: dict, seconds: float) -> dict:
    """docs/samples/<family>.png and .json: 16 samples of the model version URI, which `genpipe ARGS`
    registered with METRICS in SECONDS (here, or in a benchmark's run of the same command)."""
    png = OUT / f"{family}.png"
    subprocess.run([GENPIPE, "sample", uri, "-n", "16", "--seed", "0", "--out", str(png)], check=True, cwd=REPO)
    grey = Image.open(png).convert("L")
    if grey.convert("RGB").tobytes() == Image.open(png).tobytes():  # a grey grid stored as RGB: keep a third
        grey.save(png, optimize=True)
    record = {"command": shlex.join(["genpipe", *args]), "model_uri": uri, "pipeline_seconds": round(seconds),
              "metrics": metrics}
    (OUT / f"{family}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(families: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for family in families or list(registry.FAMILIES):
        record = draw(family)
        print(f"{family}: {record['pipeline_seconds']} s, {record['model_uri']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
