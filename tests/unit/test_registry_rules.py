"""The rules the register stage decides by: gates, comparability, and the VAE's
bits/dim bound being a real density on 8-bit data."""

import math

import pytest
import torch

from gen_models import registry
from gen_models.vae.config import VAEConfig
from gen_models.vae.vae import VAE, _continuous_bernoulli_nll
from pipelines import config
from pipelines.errors import InvalidInput
from pipelines.evaluate import bits_per_dim
from pipelines.register import check_gates, differences

SCORED = {"data_hash": "d1", "extractor_hash": "e1", "reference_hash": "r1", "eval_num_samples": "300",
          "metric.fid": "12.5", "metric.bits_per_dim": "3.1"}


def test_gates_name_what_missed_and_by_how_much():
    results = {"fid": 52.5, "bits_per_dim": 3.5, "precision": 0.7}
    assert check_gates({"fid": "<= 60", "bits_per_dim": "< 3.6", "precision": ">= 0.5"}, results) == []
    assert check_gates({"fid": "<= 40", "precision": "> 0.7"}, results) == [
        "fid = 52.5 misses '<= 40' by 12.5", "precision = 0.7 misses '> 0.7' by 0"]
    with pytest.raises(InvalidInput, match="registry.gates.recall: this model reports only bits_per_dim, fid"):
        check_gates({"recall": ">= 0.5"}, results)


@pytest.mark.parametrize("bound", ["40", "=< 40", "<= forty", "<=", ""])
def test_a_malformed_gate_is_refused_at_load(bound):
    with pytest.raises(InvalidInput, match=f"registry.gates: gate fid: bound '{bound}' is not"):
        config.parse({"registry": {"gates": {"fid": bound}}})


def test_feature_metrics_compare_only_on_the_same_features_statistics_and_n():
    assert differences(SCORED, dict(SCORED), "fid") == []
    assert differences(SCORED, {**SCORED, "extractor_hash": "e2"}, "fid") == ["extractor e1 vs e2"]
    assert differences(SCORED, {**SCORED, "eval_num_samples": "200"}, "fid") == ["sample count 300 vs 200"]
    assert differences(SCORED, {**SCORED, "data_hash": "d2"}, "fid") == ["data d1 vs d2"]
    # bits/dim is measured on the test split itself: only the data must agree
    assert differences(SCORED, {**SCORED, "extractor_hash": "e2", "eval_num_samples": "1"}, "bits_per_dim") == []
    gan = {k: v for k, v in SCORED.items() if k != "metric.bits_per_dim"} | {"version": "3"}
    assert differences(SCORED, gan, "bits_per_dim") == ["bits_per_dim not reported by v3"]


@pytest.mark.parametrize("logit", [-8.0, -1.0, -1e-4, 0.0, 0.5, 3.0, 20.0])
def test_the_continuous_bernoulli_is_a_density_on_the_unit_interval(logit):
    x = torch.linspace(0, 1, 100_001, dtype=torch.float64).view(-1, 1, 1, 1)
    density = (-_continuous_bernoulli_nll(torch.full_like(x, logit), x)).exp()
    assert torch.trapezoid(density, x.flatten()).item() == pytest.approx(1.0, abs=1e-6)


def test_vae_bits_per_dim_is_a_bound_on_8_bit_data():
    model = VAE(VAEConfig.tiny(image_size=8))
    assert model.log_prob_is_bound
    flat = torch.full((16, 1, 8, 8), 128, dtype=torch.uint8)
    # an untrained decoder puts logits near 0: a nearly flat density, so close to the 8 bits of a uniform byte
    assert bits_per_dim(model, flat) == pytest.approx(8, abs=1.0)
    # the dequantised bound stays finite at the extremes 0 and 255, where a Bernoulli "density" would not be one
    extremes = torch.tensor([0, 255], dtype=torch.uint8).repeat(32)[:, None, None, None].expand(-1, 1, 8, 8)
    assert math.isfinite(bits_per_dim(model, extremes.contiguous()))


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_every_family_names_its_sampling_cost(family):
    model = registry.build(family, registry.config_class(family).tiny(image_size=8))
    sampler, passes = model.sampling_cost()
    assert isinstance(sampler, str) and sampler and isinstance(passes, int) and passes >= 1
