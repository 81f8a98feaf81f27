"""A search trial's two channels in one actor: its reports (Train's controller -> the trial) and its pace
(the trial -> rank 0), see pipelines/tune.py.

Two `ray.util.queue.Queue`s would be two actor processes at every start of every trial. This module imports
only Ray: an actor's process imports the module that defines its class, and one that pulled in torch would
spend more starting than the second process did."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import ray


@ray.remote(num_cpus=0)
class Mailbox:
    """Named FIFO channels. Async, so a `get` waiting on one channel holds no other call."""

    def __init__(self):
        self.channels: defaultdict[str, asyncio.Queue] = defaultdict(asyncio.Queue)

    async def put(self, channel: str, item) -> None:
        await self.channels[channel].put(item)

    async def get(self, channel: str):
        return await self.channels[channel].get()


class Channel:
    """One channel of a `Mailbox`, used as a blocking queue from any process (its handle pickles)."""

    def __init__(self, mailbox, name: str):
        self.mailbox, self.name = mailbox, name

    def put(self, item) -> None:
        ray.get(self.mailbox.put.remote(self.name, item))

    def get(self):
        return ray.get(self.mailbox.get.remote(self.name))
