"""Where a command's CPU goes, by process: the machine's processes are sampled every 0.2 s while the
command runs, and each one's CPU time since the start is summed per kind (a Ray actor's class, or the
first words of its command line). A process that lives less than a sample is missed, and the last
0.2 s of each is lost: the table is a lower bound, good to a few percent on runs of many seconds.

    .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/genpipe pipeline --config jobs/smoke.yaml
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def sample(cpu: dict[str, float], names: dict[str, list[str]]) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        cpu[pid] = (int(stat[11]) + int(stat[12])) / TICK  # utime + stime
        if cmd not in (seen := names.setdefault(pid, [])):
            seen.append(cmd)  # a Ray worker renames itself for the actor it becomes: keep every name


def kind(seen: list[str]) -> str:
    actors = [m.group(1) for n in seen if (m := re.match(r"ray::(\w+)", n)) and m.group(1) != "IDLE"]
    if actors:
        return f"ray::{actors[0]}"
    words = seen[0].split()
    if words[1:3] == ["-m", "pipelines.stages"]:  # a stage job's process: by stage
        return f"stage {words[3]}"
    return " ".join(Path(w).name for w in words[:3])[:60] or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    cmd = p.parse_args().command
    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    before: dict[str, float] = {}
    sample(before, {})
    cpu, names, done = dict(before), {}, threading.Event()

    def loop():
        while not done.wait(0.2):
            sample(cpu, names)

    sampler = threading.Thread(target=loop)
    sampler.start()
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t0
    time.sleep(2)  # the head's processes finish their share of the command's end
    done.set()
    sampler.join()
    sample(cpu, names)
    by_kind, count = collections.Counter(), collections.Counter()
    for pid, seconds in cpu.items():
        if (used := seconds - before.get(pid, 0.0)) >= 0.05 and pid != str(os.getpid()):
            by_kind[kind(names[pid])] += used
            count[kind(names[pid])] += 1
    print(f"{'CPU s':>7}  {'procs':>5}  kind")
    for k, seconds in by_kind.most_common():
        print(f"{seconds:7.1f}  {count[k]:5d}  {k}")
    print(f"{sum(by_kind.values()):7.1f}  {sum(count.values()):5d}  total, over {wall:.1f} s of wall (exit {rc})")


if __name__ == "__main__":
    main()
