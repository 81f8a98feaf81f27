"""When each test ran, and on which xdist worker: where the suite's time goes.

As a pytest plugin it appends one line per test start and end to $SUITE_TIMELINE (every worker writes to
the same file), with the machine's busy CPU-seconds so far; as a script it prints each worker's span and
its files in the order they ran:

    SUITE_TIMELINE=/tmp/timeline.tsv PYTHONPATH=benchmarks bash scripts/test.sh -p suite_timeline
    python3 benchmarks/suite_timeline.py /tmp/timeline.tsv     # or a .tsv.gz of benchmarks/results

Run one test at a time (`-n 0`) on an otherwise idle machine, the machine's CPU over a test is that
test's, its Ray jobs, servers and CLIs included (a per-process count misses the short-lived ones): the
script then adds each file's CPU-seconds and the tests that took the most.

    SUITE_TIMELINE=/tmp/serial.tsv PYTHONPATH=benchmarks .venv/bin/python -m pytest -n 0 -p suite_timeline \
        tests/integration tests/e2e
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from collections import defaultdict
from pathlib import Path


def _busy_cpu_s() -> float:
    """CPU-seconds the machine has spent busy since boot, every core together (/proc/stat: not idle or iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _write(event: str, nodeid: str) -> None:
    with open(os.environ.get("SUITE_TIMELINE", "suite_timeline.tsv"), "a") as f:
        f.write(f"{time.time():.1f}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{event}\t{nodeid}"
                f"\t{_busy_cpu_s():.1f}\n")


def pytest_runtest_logstart(nodeid, location):
    _write("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _write("end", nodeid)


def main(path: str) -> None:
    data = Path(path).read_bytes()
    text = (gzip.decompress(data) if path.endswith(".gz") else data).decode()  # the logs keep it gzipped
    rows = [line.split("\t") for line in text.splitlines()]
    t0 = min(float(r[0]) for r in rows)
    started, spans = {}, defaultdict(list)
    workers = {r[1] for r in rows}
    serial = workers == {"main"} and all(len(r) == 5 for r in rows)  # timelines before 2026-12-06e have no CPU
    for t, worker, event, nodeid, *cpu in rows:
        if worker == "main" and workers != {"main"}:
            continue  # under xdist the controller sees each test again, as its worker reports it
        at = (float(t) - t0, float(cpu[0]) if serial else 0.0)
        if event == "start":
            started[worker, nodeid] = at
        else:
            (start, cpu_start), (end, cpu_end) = started[worker, nodeid], at
            spans[worker].append((start, end, nodeid, cpu_end - cpu_start))
    for worker, items in sorted(spans.items()):
        items.sort()
        print(f"{worker}: {len(items)} tests, from {items[0][0]:.0f} s to {items[-1][1]:.0f} s"
              + (f", {sum(i[3] for i in items):.0f} CPU-s" if serial else ""))
        runs: list[list] = []  # consecutive tests of one file: [file, start, end, count, cpu]
        for start, end, nodeid, cpu in items:
            file = nodeid.split("::")[0]
            if runs and runs[-1][0] == file:
                runs[-1][2:] = [end, runs[-1][3] + 1, runs[-1][4] + cpu]
            else:
                runs.append([file, start, end, 1, cpu])
        for file, start, end, count, cpu in runs:
            print(f"  {start:6.0f} {end:6.0f} {end - start:5.0f} s {count:4d}  {file}"
                  + (f"  {cpu:5.0f} CPU-s" if serial else ""))
        if serial:
            print("  the most CPU:")
            for start, end, nodeid, cpu in sorted(items, key=lambda i: -i[3])[:15]:
                print(f"  {cpu:6.1f} CPU-s {end - start:6.1f} s  {nodeid}")


if __name__ == "__main__":
    main(sys.argv[1])
