"""DDPM learns scikit-learn's 8x8 digits on one CPU thread. Run alone with `-m learning`.

Setup: T = 200 with the cosine schedule (better than linear at 8x8: linear
gave FID 5.4 against cosine's 3.9 at lr 1e-3), a 173k-parameter UNet (widths
16, 32; one block per level), Adam 2e-3 and EMA 0.995 for a run of 1000 steps;
FID of 397 samples against the 397 test digits on the pipelines.metrics
extractor (97.7 % accuracy), as test_learning.py's DCGAN test.

Margins measured over 2 seeds (model init and data order 0 and 1), against the
thresholds asserted:
  DDIM-50 FID / untrained model's DDIM-50 FID: 0.099, 0.093 (< 0.2); the
      untrained model is at 49-52, the ancestral sampler at 3.3-3.4, the test
      split's own train digits at 2.5.
  DDIM-50 FID / ancestral (200 steps) FID: 1.49, 1.39 (< 2). The gap is
      eta = 0 against a stochastic sampler, not the step count: DDIM over all
      200 steps scores within 3 % of DDIM-50 (4.95 against 5.11), and with
      1000 samples instead of 397 the ratio is 1.6 for both sampling seeds
      tried. Song et al. report 1.47 at 50 steps on CIFAR-10 (4.67 against 3.17).
Time: 85 s of CPU for the whole pytest process, 155 s wall on a shared 2-core
machine under a load of 5-6 (no unloaded measurement); training is about two
thirds of it and the 200-step ancestral sampler a fifth.
"""

from __future__ import annotations

import pytest
import torch

from gen_models.base import GenerativeModel
from gen_models.registry import build
from tests.unit.learning import fit

pytestmark = pytest.mark.learning


def test_ddpm_fid_falls_and_ddim_keeps_up(digits, judge):
    def fid(model: GenerativeModel, **sampler) -> float:
        return judge.fid(model.sample(len(digits["x_test"]), generator=torch.Generator().manual_seed(1), **sampler))

    model = build("ddpm", {"image_size": 8, "channels": 1, "timesteps": 200, "schedule": "cosine",
                           "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                           "lr": 2e-3, "ema_decay": 0.995})
    untrained = fid(model, sampler="ddim", steps=50)
    fit(model, digits["x_train"], digits["y_train"], steps=1000)
    ancestral = fid(model, sampler="ddpm")
    ddim = fid(model, sampler="ddim", steps=50)

    assert ddim < 0.2 * untrained, (untrained, ddim)
    assert ddim < 2.0 * ancestral, (ancestral, ddim)
