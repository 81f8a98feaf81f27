"""The Ray-free training loop: batches by step number, per-step seeding, the hot loop.

Where training stands is one integer. The global batch at a step is a function
of (seed, step) and its randomness of (seed, rank, step), reseeded every step,
so a run resumed at step k continues exactly as the uninterrupted run would have,
with no RNG state to save, and 2 workers x b take the same steps as 1 x 2b. The
train stage runs this loop on every Ray Train worker (`pipelines.worker`); the
benchmarks and tests run it bare.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from gen_models import registry
from gen_models.base import GenerativeModel, StepContext

if TYPE_CHECKING:
    from pipelines.config import PipelineSpec


class StepBatches:
    """Batch `step` of an endless, epoch-wise shuffled pass over the data.

    The global batch at a step is the same whatever the world size; rank r
    takes its r-th contiguous slice. So 2 workers x b see exactly what
    1 worker x 2b sees. `x` is any uint8 image set indexed by a tensor of
    indices: a tensor, or a split read in place (`data.ShardedImages`).
    """

    def __init__(self, x, y: Tensor, *, global_batch: int, seed: int, rank: int, world: int,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.x, self.y = x, y
        self.memory_format = memory_format
        self.n = len(x)
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.local = global_batch // world
        self._perms: dict[int, Tensor] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future] | None = None  # (step, its batch being read)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # On the data's device: indexing a GPU tensor with CPU indices would copy
            # them over synchronously every step, stalling the launch queue.
            self._perms = {epoch: torch.randperm(self.n, generator=g).to(self.x.device)}  # one epoch at a time
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        # Slices of cached permutations, not per-element arithmetic: this runs every step.
        pos, left, parts = step * self.global_batch + self.rank * self.local, self.local, []
        while left:  # at most two epochs meet in one batch
            epoch, offset = divmod(pos, self.n)
            take = min(left, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            pos, left = pos + take, left - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = self._take(step, device)
        x = x.to(device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=self.memory_format), y.to(device, non_blocking=True)

    def _take(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The uint8 images and labels of `step`. A split read from disk is read a step ahead, in a thread,
        into pinned memory for a GPU: the reads and the copy to the device overlap the step before."""
        if isinstance(self.x, Tensor):
            idx = self.indices(step)
            return self.x[idx], self.y[idx]
        pin = device.type == "cuda"
        ahead, self._ahead = self._ahead, None
        got = ahead[1].result() if ahead else None  # waited for even when unused: one thread at a time
        if ahead is None or ahead[0] != step:  # the first step, or a jump (a resume, a rollback)
            got = self._read(step, pin)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1, pin))
        return got

    def _read(self, step: int, pin: bool) -> tuple[Tensor, Tensor]:
        idx = self.indices(step)
        x, y = self.x[idx], self.y[idx]
        return (x.pin_memory(), y.pin_memory()) if pin else (x, y)


def build_model(spec: PipelineSpec, manifest: dict, device: torch.device) -> tuple[GenerativeModel, StepContext]:
    """The spec's model sized to the prepared data, on `device`, and the step context that trains it.
    Seeded with the spec's seed first, so every rank (and every re-run) starts from the same weights."""
    c, h, _ = manifest["shape"]
    config = spec.model.build_config(image_size=h, channels=c, num_classes=manifest["num_classes"])
    torch.manual_seed(spec.seed)
    model = registry.build(spec.model.family, config).to(device)
    ctx = StepContext(optimizers=model.configure_optimizers(), grad_clip=spec.train.grad_clip,
                      amp_dtype=torch.bfloat16 if spec.train.precision == "bf16" else None,
                      device_type=device.type)
    return model, ctx


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed per (seed, rank, step), hashed so no two ranks' streams ever coincide."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest(), "little") >> 1


def seed_step(seed: int, device: torch.device) -> None:
    """Reseed the generators a step draws from: the CPU's and, on a GPU, that device's.

    Not `torch.manual_seed`: it seeds every backend, and while CUDA is uninitialised it queues
    each seeding with a formatted stack trace, about 150 us a call on this VM's CPU, paid every step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)


def run_steps(model: GenerativeModel, ctx: StepContext, batches: StepBatches, *, start: int, stop: int,
              seed: int, device: torch.device, report_due) -> Iterator[tuple[int, dict[str, float]]]:
    """The hot loop: steps `start`..`stop`, yielding (step, window means + img/s) when `report_due(step)`.

    A step's metrics (detached tensors) are only kept; they are averaged at the
    report, so no step waits on a host sync or launches kernels of its own. Time
    spent by the consumer between yields is not counted in img_per_s.
    """
    model.train()
    window: list[dict] = []
    t0 = time.perf_counter()
    for step in range(start, stop):
        seed_step(step_seed(seed, batches.rank, step), device)
        ctx.step = step
        with ctx.autocast():
            out = model.training_step(batches.batch(step, device), ctx)
        model.on_step_end(step + 1)
        window.append(out)
        if report_due(step + 1):
            metrics = {k: float(sum(o[k] for o in window)) / len(window) for k in window[0]}
            metrics["img_per_s"] = batches.global_batch * len(window) / (time.perf_counter() - t0)
            yield step + 1, metrics
            window, t0 = [], time.perf_counter()
