"""The trainer's pure parts: step-indexed batches and the step context."""

import torch

from gen_models.base import StepContext
from pipelines.steps import StepBatches, seed_step, step_seed


def _batches(world: int, rank: int, n: int = 50, batch: int = 8) -> StepBatches:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return StepBatches(x, torch.arange(n), global_batch=batch, seed=3, rank=rank, world=world)


def test_two_ranks_split_exactly_the_single_worker_batch():
    for step in (0, 5, 6, 7, 40):  # 50 images / 8: steps 6 and 12 straddle an epoch boundary
        whole = _batches(1, 0).indices(step)
        halves = torch.cat([_batches(2, r).indices(step) for r in range(2)])
        assert torch.equal(whole, halves)


def test_every_epoch_is_a_permutation_and_epochs_differ():
    b = _batches(1, 0, n=48, batch=8)
    first = torch.cat([b.indices(s) for s in range(6)])
    second = torch.cat([b.indices(s) for s in range(6, 12)])
    assert sorted(first.tolist()) == list(range(48)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_batches_depend_only_on_the_step():
    assert torch.equal(_batches(1, 0).indices(9), _batches(1, 0).indices(9))
    x, y = _batches(1, 0).batch(2, torch.device("cpu"))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 49 / 255
    assert torch.equal((x.flatten() * 255).round().long(), y)


def test_step_seeds_differ_by_rank_and_step():
    seeds = {step_seed(0, r, s) for r in range(4) for s in range(0, 100_000, 7)}
    assert len(seeds) == 4 * len(range(0, 100_000, 7))
    assert step_seed(0, 0, 5) == step_seed(0, 0, 5) != step_seed(1, 0, 5)


def test_seed_step_fixes_the_draws_whatever_came_before():
    cpu = torch.device("cpu")
    seed_step(step_seed(0, 0, 3), cpu)
    first = (torch.randn(4), torch.randint(10, (4,)), torch.rand(4))
    torch.rand(100)  # a different history of draws
    seed_step(step_seed(0, 0, 3), cpu)
    assert all(torch.equal(a, b) for a, b in zip(first, (torch.randn(4), torch.randint(10, (4,)), torch.rand(4))))
    seed_step(step_seed(0, 0, 4), cpu)
    assert not torch.equal(first[0], torch.randn(4))


def test_grad_clip_bounds_the_update():
    w = torch.nn.Parameter(torch.zeros(3))
    ctx = StepContext(optimizers={"m": torch.optim.SGD([w], lr=1.0)}, grad_clip=0.5)
    ctx.zero_grad("m")
    ctx.backward((w * torch.tensor([100.0, 0.0, 0.0])).sum())
    ctx.step_optimizer("m")
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 0.0, 0.0]))
