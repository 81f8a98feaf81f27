"""The README grids of the seven families whose CPU command changed on 2026-12-07, drawn from the
"changed" runs of cpu_commands_<family>.log (those commands, plus a name of their own) rather than
by running each command a second time: the runs are deterministic, and `scripts/family_grids.py FAMILY`
draws the same grid from scratch.

    GENPIPE_HOME=/tmp/cpuhome16 .venv/bin/python benchmarks/results/cpu-2026-12-07c/draw_grids.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
from scripts.family_grids import cpu_command, grid  # noqa: E402

for family in ("vae", "beta_vae", "conv_vae", "pixelcnn", "wgan", "wgan_gp", "stylegan"):
    rows = [json.loads(line) for line in (HERE / f"cpu_commands_{family}.log").read_text().splitlines()
            if line.startswith("{")]
    changed = next(r for r in rows if r["run"] == "changed")
    args = cpu_command(REPO / "jobs" / f"{family}.yaml")  # the header now carries the change
    assert args[-1] == changed["sets"][0], (args, changed["sets"])
    record = grid(family, args, f"models:/{family}-changed/1", changed["metrics"], changed["wall_s"])
    print(family, record["model_uri"], round(record["metrics"]["fid"], 1), flush=True)
