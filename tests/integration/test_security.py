"""What the CLI starts listens on loopback only."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from tests.realparts import head_process

pytestmark = pytest.mark.integration


def _listening(process: psutil.Process) -> list:
    # Ray's workers come and go; one that exits between children() and here listens on nothing.
    try:
        return [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


def test_local_head_listens_on_loopback_only(home):
    head = head_process(home)
    listening = [entry for p in [head, *head.children(recursive=True)] for entry in _listening(p)]
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, agents: it did look at them
    exposed = [(name, addr) for name, addr in listening
               if not ipaddress.ip_address(addr.ip.removeprefix("::ffff:")).is_loopback]
    assert not exposed, exposed
