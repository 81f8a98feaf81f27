"""When each test ran, and on which xdist worker: where the suite's time goes.

As a pytest plugin it appends one line per test start and end to $SUITE_TIMELINE (every worker writes to
the same file); as a script it prints each worker's span and its files in the order they ran:

    SUITE_TIMELINE=/tmp/timeline.tsv PYTHONPATH=benchmarks bash scripts/test.sh -p suite_timeline
    python3 benchmarks/suite_timeline.py /tmp/timeline.tsv     # or a .tsv.gz of benchmarks/results
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from collections import defaultdict
from pathlib import Path


def _write(event: str, nodeid: str) -> None:
    with open(os.environ.get("SUITE_TIMELINE", "suite_timeline.tsv"), "a") as f:
        f.write(f"{time.time():.1f}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{event}\t{nodeid}\n")


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
    for t, worker, event, nodeid in rows:
        if worker == "main" and workers != {"main"}:
            continue  # under xdist the controller sees each test again, as its worker reports it
        if event == "start":
            started[worker, nodeid] = float(t) - t0
        else:
            spans[worker].append((started[worker, nodeid], float(t) - t0, nodeid))
    for worker, items in sorted(spans.items()):
        items.sort()
        print(f"{worker}: {len(items)} tests, from {items[0][0]:.0f} s to {items[-1][1]:.0f} s")
        runs: list[list] = []  # consecutive tests of one file: [file, start, end, count]
        for start, end, nodeid in items:
            file = nodeid.split("::")[0]
            if runs and runs[-1][0] == file:
                runs[-1][2:] = [end, runs[-1][3] + 1]
            else:
                runs.append([file, start, end, 1])
        for file, start, end, count in runs:
            print(f"  {start:6.0f} {end:6.0f} {end - start:5.0f} s {count:4d}  {file}")


if __name__ == "__main__":
    main(sys.argv[1])
