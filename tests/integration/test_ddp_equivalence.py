"""2 DDP workers x batch b take the same steps as 1 worker x batch 2b.

The trainer's pieces (StepBatches, run_steps, wrap_ddp) run in 2 gloo
processes against 1 process. The VAE's reparameterisation noise is drawn per
rank, so no two world sizes can share it; the test zeroes it (z = mu), which
leaves exactly what is under test: the sharding of each global batch and the
gradient averaging.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gen_models import registry
from gen_models.base import StepContext
from pipelines.steps import StepBatches, run_steps

pytestmark = pytest.mark.integration

STEPS, GLOBAL_BATCH = 8, 32


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (200,), generator=g)


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = registry.build("vae", {"image_size": 8, "channels": 1})
    ctx = StepContext(optimizers=model.configure_optimizers())
    if world > 1:
        model.wrap_ddp(lambda m: DDP(m, forward_sync_buffers=False))
    x, y = _data()
    batches = StepBatches(x, y, global_batch=GLOBAL_BATCH, seed=0, rank=rank, world=world)
    for _ in run_steps(model, ctx, batches, start=0, stop=STEPS, seed=0, device=torch.device("cpu"),
                       report_due=lambda done: False):
        pass
    return {k: v.clone() for k, v in model.plain_state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.randn_like = torch.zeros_like  # z = mu: see the module docstring (a fresh spawned process)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    state = _train(rank, 2)
    torch.save(state, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_workers_match_one_worker_with_twice_the_batch(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path / "state")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"state.{r}", weights_only=True) for r in range(2)]
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    torch.manual_seed(0)
    initial = registry.build("vae", {"image_size": 8, "channels": 1}).plain_state_dict()
    single = _train(0, 1)
    moved = max((single[k] - initial[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-3  # the steps did something worth comparing
    for k in single:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=f"ranks differ at {k}")
        torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-4, atol=1e-6, msg=f"2x{GLOBAL_BATCH // 2} != 1x{GLOBAL_BATCH} at {k}")
