"""pipelines.cluster.free_port: ports for servers that bind them later (a Ray head's, a test's servers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DRAWS = 300


def test_processes_drawing_at_once_never_get_the_same_port():
    # Two heads started at the same moment (a test's and a cluster's) each draw about ten ports.
    code = f"from pipelines.cluster import free_port; print(*(free_port() for _ in range({DRAWS})))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2]) for _ in range(2)]
    drawn = [set(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert [len(d) for d in drawn] == [DRAWS, DRAWS]
    assert all(20000 <= port < 32768 for d in drawn for port in d)  # below the kernel's ephemeral range
    assert not drawn[0] & drawn[1]
