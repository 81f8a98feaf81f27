"""What the CLI starts listens on loopback only."""

from __future__ import annotations

import ipaddress
import json

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_local_head_listens_on_loopback_only(home):
    head = psutil.Process(json.loads((home["path"] / "ray" / "head.json").read_text())["pid"])
    listening = [(p.name(), c.laddr) for p in [head, *head.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, agents: it did look at them
    exposed = [(name, addr) for name, addr in listening
               if not ipaddress.ip_address(addr.ip.removeprefix("::ffff:")).is_loopback]
    assert not exposed, exposed
