"""Each family's CPU command (the one its job spec's header gives), as it is and with a change, in one run.

    .venv/bin/python benchmarks/cpu_commands.py --change model.betas=[0.0,0.999] gan cgan dcgan

For each family: `genpipe pipeline` with the spec's CPU command, then the same command with the
`--change` sets, both under names of their own in one GENPIPE_HOME (the shards and the extractor are
prepared once and shared by content hash, so both score against the same statistics). Same seed, so
the two runs start from the same weights and batches. Prints a table and one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.family_grids import GENPIPE, cpu_command


def run(family: str, sets: list[str], tag: str) -> dict:
    args = cpu_command(REPO / "jobs" / f"{family}.yaml")
    for s in sets:
        args += ["--set", s]
    args += ["--set", f"name={family}-{tag}", "--set", f"registry.model_name={family}-{tag}"]
    t0 = time.time()
    r = subprocess.run([GENPIPE, *args], capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{family} {tag}: exit {r.returncode}\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    row = {"family": family, "run": tag, "sets": sets, "wall_s": round(wall, 1), "metrics": out["metrics"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("families", nargs="+")
    p.add_argument("--change", action="append", required=True, help="a --set to add, as KEY=VALUE (repeatable)")
    a = p.parse_args()
    rows = [run(f, sets, tag) for f in a.families for sets, tag in (([], "spec"), (a.change, "changed"))]
    print(f"\nchange: {' '.join(a.change)}\n| family | run | wall s | FID | bits/dim |\n|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        bpd = f"{m['bits_per_dim']:.3f}" if "bits_per_dim" in m else ""
        print(f"| {r['family']} | {r['run']} | {r['wall_s']} | {m.get('fid', float('nan')):.1f} | {bpd} |")


if __name__ == "__main__":
    main()
