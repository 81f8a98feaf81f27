"""Any number of images from a registered model, as `genpipe sample` draws them.

A request to the served model asks for at most `serving.MAX_N` images, so n images are drawn as
consecutive requests of MAX_N (the last one shorter), each through the same `predict` the server
runs. Request 0 is seeded by the seed itself: up to MAX_N images are exactly what the server
answers for (n, seed). Request k is seeded by a seed derived from (seed, k). The images thus
depend on n and seed only, never on how they are written or how progress is shown.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
from torch import nn

from gen_models.base import GenerativeModel
from pipelines.serving import MAX_N

Request = Callable[[int, int], np.ndarray]  # (n <= MAX_N, seed) -> uint8 images (n, C, H, W)


def chunks(n: int, seed: int) -> list[tuple[int, int]]:
    """(images, seed) of each request that draws n images from `seed`."""
    sizes = [min(MAX_N, n - i) for i in range(0, n, MAX_N)]
    # SeedSequence: request k's stream is independent of request 0's and of other seeds' requests;
    # shifted to 63 bits, the seeds fit the signature's int64
    derived = [int(s.generate_state(1, np.uint64)[0] >> 1) for s in np.random.SeedSequence(seed).spawn(len(sizes) - 1)]
    return list(zip(sizes, [seed, *derived]))


class Progress:
    """`genpipe: sampling 40% (800/2000 images done), 1m12s left` on a stream: rewritten in place on a
    terminal, a new line at most every `every` seconds otherwise (a log), and always at the end."""

    def __init__(self, n: int, passes: int, stream: TextIO, every: float | None = None):
        self.n, self.passes, self.stream = n, passes, stream
        self.tty = stream.isatty()
        self.every = every if every is not None else (0.2 if self.tty else 10.0)
        self.done = self.size = self.in_request = 0
        self.start = self.shown = time.monotonic()

    def request(self, size: int) -> None:
        self.size, self.in_request = size, 0

    def network_pass(self, *_) -> None:
        self.in_request += 1
        self._show()

    def request_done(self) -> None:
        self.done, self.size = self.done + self.size, 0
        self._show()

    def _show(self) -> None:
        now = time.monotonic()
        end = self.done == self.n
        if not end and now - self.shown < self.every:
            return
        self.shown = now
        part = self.done + self.size * self.in_request / self.passes
        took = now - self.start
        line = f"genpipe: sampling {part / self.n:.0%} ({self.done}/{self.n} images done)"
        if end:
            line += f", in {_duration(took)}"
        elif part:
            line += f", {_duration(took * (self.n - part) / part)} left"
        self.stream.write(f"\r{line}\x1b[K" + "\n" * end if self.tty else line + "\n")
        self.stream.flush()


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


@contextlib.contextmanager
def counting_passes(model: nn.Module, on_pass: Callable) -> Iterator[None]:
    """Calls `on_pass` on each forward call of the model's top-level modules. Every family's sampler runs
    one of them once per sequential pass (a denoising step, a pixel, a Langevin step), the unit that
    `sampling_cost` counts (tests/unit/test_sampling.py holds each family to it), so progress inside one
    slow request needs no hook in each family."""
    handles = [m.register_forward_hook(on_pass) for m in model.children()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def draw(request: Request, model: GenerativeModel, n: int, seed: int, *, stream: TextIO = sys.stderr,
         every: float | None = None) -> Iterator[np.ndarray]:
    """The n images from `seed`, request by request. Progress goes to `stream` for a draw of several
    requests or a sampler of several passes (DDPM, PixelCNN, an EBM); one-pass single requests are quick."""
    plan = chunks(n, seed)
    passes = model.sampling_cost()[1]
    if len(plan) == 1 and passes == 1:
        yield request(*plan[0])
        return
    progress = Progress(n, passes, stream, every)
    with counting_passes(model, progress.network_pass):
        for size, s in plan:
            progress.request(size)
            images = request(size, s)
            progress.request_done()
            yield images


def write_npy(path: Path, n: int, images: Iterator[np.ndarray]) -> None:
    """The n images into `path` as .npy, through a memory map beside it that replaces it once complete:
    memory holds one request's images, and a draw cut short leaves what was at `path` as it was."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        out, i = None, 0
        for x in images:
            if out is None:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, *x.shape[1:]))
            out[i:i + len(x)] = x
            i += len(x)
        out.flush()
        del out  # closes the map before the rename
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
