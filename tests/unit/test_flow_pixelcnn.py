"""What RealNVP and PixelCNN promise beyond the contract suite: an invertible
flow whose log-determinant is the true one and that transforms every
dimension; a PixelCNN that never looks ahead and never rewrites its weights;
and log_prob in the units pipelines.evaluate.bits_per_dim expects.

Each structural check also runs on a deliberately broken model (masks that
never flip, a mask that looks at the centre), so it is seen to fail."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from gen_models.autoregressive.config import PixelCNNConfig
from gen_models.autoregressive.pixelcnn import PixelCNN
from gen_models.flow.config import RealNVPConfig
from gen_models.flow.realnvp import RealNVP
from gen_models.nn.coupling import AffineCoupling
from gen_models.nn.masked_conv import MaskedConv2d
from pipelines.evaluate import bits_per_dim

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: threads only contend


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bytes_in_unit(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images as the pipeline passes them: bytes / 255."""
    return torch.randint(256, (n, c, s, s), generator=seeded(seed)).float() / 255


# --- RealNVP ----------------------------------------------------------------

def realnvp(channels: int = 1, num_scales: int = 2, **overrides) -> RealNVP:
    torch.manual_seed(0)
    return RealNVP(RealNVPConfig.tiny(image_size=8, channels=channels, num_scales=num_scales, **overrides))


@pytest.mark.parametrize("image_size, channels, num_scales", [(8, 1, 2), (8, 3, 2), (28, 1, 2), (28, 3, 1)])
def test_realnvp_round_trip(image_size, channels, num_scales):
    torch.manual_seed(0)
    model = RealNVP(RealNVPConfig.tiny(image_size=image_size, channels=channels, num_scales=num_scales))
    y = model.dequantize(bytes_in_unit(4, channels, image_size), seeded(1))
    z, _ = model(y)
    assert z.shape == y.shape
    assert (model.inverse(z) - y).abs().max() < 1e-4
    # the inverse pass reports the opposite log-determinant
    h, logdet = model.flow(y)
    _, logdet_inverse = model.flow(h, reverse=True)
    assert torch.allclose(logdet_inverse, -logdet, atol=1e-4)


def untouched_dimensions(flow: torch.nn.Module, shape: tuple[int, ...]) -> list[int]:
    """Output dimensions that are a plain copy of one input dimension: Jacobian row = a unit vector."""
    x = torch.randn(1, *shape, generator=seeded(2), dtype=torch.float64)
    jac = jacobian(lambda v: flow(v.view(1, *shape))[0].flatten(), x.flatten())
    return [i for i, row in enumerate(jac) if (row != 0).sum() == 1 and row.abs().max() == 1]


@pytest.mark.parametrize("channels, num_scales", [(1, 1), (1, 2), (3, 1)])
def test_realnvp_transforms_every_dimension(channels, num_scales):
    model = realnvp(channels, num_scales).double()
    shape = (channels, 8, 8)
    assert untouched_dimensions(model.flow, shape) == []

    # The tutorial bug: every coupling of a kind keeps the same half. Then the
    # dimensions that every kind keeps pass through as they came.
    first_mask: dict[tuple[int, ...], torch.Tensor] = {}
    for layer in model.flow.layers:
        if isinstance(layer, AffineCoupling):
            layer.mask.copy_(first_mask.setdefault(tuple(layer.mask.shape), layer.mask.clone()))
    assert untouched_dimensions(model.flow, shape)


@pytest.mark.parametrize("channels", [1, 3])
def test_realnvp_log_det_matches_the_jacobian(channels):
    """Change of variables with an explicit Jacobian, in float64:
    log p(y) = log N(z; 0, I) + log|det dz/dy|, logit transform included."""
    model = realnvp(channels).double()
    shape = (1, channels, 8, 8)
    x = bytes_in_unit(1, channels, 8).double()
    y = model.dequantize(x, seeded(3))

    z, logdet = model(y)
    _, full = torch.linalg.slogdet(jacobian(lambda v: model(v.view(shape))[0].flatten(), y.flatten()))
    assert logdet.item() == pytest.approx(full.item(), abs=1e-8)

    # the coupling stack alone, and the logit transform's share in closed form
    a = model.config.alpha
    p = a + (1 - 2 * a) * y
    h = torch.logit(p)
    _, stack = torch.linalg.slogdet(jacobian(lambda v: model.flow(v.view(shape))[0].flatten(), h.flatten()))
    logit_share = (math.log(1 - 2 * a) - torch.log(p * (1 - p))).sum()
    assert full.item() == pytest.approx(stack.item() + logit_share.item(), abs=1e-8)
    assert abs(logit_share.item()) > 1  # the check above would notice it missing

    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    assert model.log_prob(x, generator=seeded(3)).item() == pytest.approx((log_prior + full).item(), abs=1e-8)


def test_realnvp_loss_is_nats_per_dimension_of_log_prob():
    model = realnvp(3)
    x = bytes_in_unit(8, 3, 8)
    torch.manual_seed(4)
    loss, metrics = model.loss((x, torch.zeros(8, dtype=torch.long)))
    torch.manual_seed(4)
    lp = model.log_prob(x)  # the same dequantisation noise, drawn from the global RNG
    dims = 3 * 8 * 8
    assert loss.item() == pytest.approx(-lp.mean().item() / dims, rel=1e-5)
    # the 8-bit rescaling: bits/dim = nats per dimension / ln 2 + 8
    assert metrics["bits_per_dim"].item() == pytest.approx(loss.item() / math.log(2) + 8, rel=1e-5)


def test_realnvp_samples_are_8_bit_images():
    x = realnvp().sample(6, generator=seeded(5))
    assert torch.equal((x * 255).round() / 255, x)


@pytest.mark.parametrize("bad", [{"couplings_per_mask": 1}, {"num_scales": 0}, {"hidden": 0},
                                 {"num_blocks": 0}, {"alpha": 0.5}, {"alpha": 0.0}, {"lr": 0.0}])
def test_realnvp_config_rejects(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RealNVPConfig.tiny(**bad)


def test_realnvp_config_needs_image_size_divisible_by_its_squeezes():
    RealNVPConfig.tiny(image_size=28, num_scales=2)  # 28 -> 14 -> 7
    with pytest.raises(ValueError, match="num_scales"):
        RealNVPConfig.tiny(image_size=28, num_scales=3)


# --- PixelCNN ---------------------------------------------------------------

def pixelcnn(channels: int = 1, **overrides) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(PixelCNNConfig.tiny(image_size=8, channels=channels, **{"hidden": 12, **overrides}))


def dependence(net, byte: torch.Tensor) -> torch.Tensor:
    """dep[k, i, j] = the inputs (C, H, W) from which the logits of colour k at
    pixel (i, j) get a gradient, in any of the images (a ReLU that happens to
    be off at one image would hide a connection)."""
    n, c, s, _ = byte.shape
    byte = byte.clone().requires_grad_(True)
    logits = net(byte).view(n, 256, c, s, s).sum((0, 1))  # (C, H, W)
    return torch.stack([(torch.autograd.grad(out, byte, retain_graph=True)[0] != 0).any(0)
                        for out in logits.flatten()]).view(c, s, s, c, s, s)


def causal(c: int, s: int) -> torch.Tensor:
    """allowed[k, i, j] = inputs before (i, j) in raster order, and colours < k at (i, j)."""
    order = torch.arange(s * s).view(s, s)
    allowed = torch.zeros(c, s, s, c, s, s, dtype=torch.bool)
    for k in range(c):
        for i in range(s):
            for j in range(s):
                allowed[k, i, j] = (order < order[i, j]).expand(c, s, s).clone()
                allowed[k, i, j, :k, i, j] = True
    return allowed


@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnn_never_looks_ahead(channels):
    model = pixelcnn(channels, num_layers=2)
    byte = torch.randint(256, (4, channels, 8, 8), generator=seeded(6)).float()
    dep = dependence(model.net, byte)
    assert not (dep & ~causal(channels, 8)).any()
    # ...and does see what it may: the pixel to the left, the one above, the earlier colours here
    assert all(dep[k, i, j, :, i, j - 1].all() for k in range(channels) for i in range(8) for j in range(1, 8))
    assert all(dep[k, i, j, :, i - 1, j].all() for k in range(channels) for i in range(1, 8) for j in range(8))
    assert all(dep[k, i, j, :k, i, j].all() for k in range(channels) for i in range(8) for j in range(8))

    # a first layer with mask B would let every output see its own value
    first = model.net.body[0]
    first.mask.copy_(MaskedConv2d(channels, 12, 7, mask_type="B", colours=channels).mask)
    assert (dependence(model.net, byte) & ~causal(channels, 8)).any()


@pytest.mark.parametrize("mask_type, sees_centre", [("A", False), ("B", True)])
def test_masked_conv_centre(mask_type, sees_centre):
    torch.manual_seed(0)
    conv = MaskedConv2d(1, 1, 3, mask_type=mask_type)
    x = torch.randn(1, 1, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(conv(x)[0, 0, 2, 2], x)
    assert (grad[0, 0, 2, 2] != 0).item() == sees_centre
    assert (grad[0, 0, 2, 3:] == 0).all() and (grad[0, 0, 3:] == 0).all()  # never right or below
    assert (grad[0, 0, 1, 1:4] != 0).all() and grad[0, 0, 2, 1] != 0  # the row above and the left


def test_masked_conv_orders_colours_within_a_pixel():
    mask = MaskedConv2d(3, 6, 3, mask_type="A", colours=3).mask[:, :, 1, 1]
    # output channel k is colour k % 3 and sees input colours strictly before it
    assert torch.equal(mask, torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]] * 2).float())
    mask = MaskedConv2d(6, 3, 1, mask_type="B", colours=3).mask[:, :, 0, 0]
    assert torch.equal(mask, torch.tensor([[1, 0, 0] * 2, [1, 1, 0] * 2, [1, 1, 1] * 2]).float())


def test_forward_does_not_rewrite_weights():
    model = pixelcnn(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = model.loss((bytes_in_unit(4, 3, 8), torch.zeros(4, dtype=torch.long)))
    loss.backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for conv in (m for m in model.modules() if isinstance(m, MaskedConv2d)):
        hidden = 1 - conv.mask
        assert (conv.weight * hidden).abs().sum() > 0  # masked taps keep their values...
        assert (conv.weight.grad * hidden == 0).all()  # ...and get no gradient, so never move


def test_pixelcnn_log_prob_is_the_cross_entropy_in_bits_per_dim_units():
    model = pixelcnn(3)
    x = bytes_in_unit(5, 3, 8, seed=7)
    dims = 3 * 8 * 8
    logits, byte = model.logits(x)
    log_p = logits.log_softmax(1).gather(1, byte[:, None])[:, 0].flatten(1).sum(1)
    lp = model.log_prob(x)
    # a density on [0, 1]^D: the byte's probability spread over its bin of volume 256^-D
    assert torch.allclose(lp, log_p + dims * math.log(256), rtol=1e-6)

    loss, metrics = model.loss((x, torch.zeros(5, dtype=torch.long)))
    assert loss.item() == pytest.approx(-log_p.mean().item() / dims, rel=1e-5)
    # evaluate's +8 cancels the D ln 256: its bits/dim is the discrete one, -log2 P / D
    expected = loss.item() / math.log(2)
    assert metrics["bits_per_dim"].item() == pytest.approx(expected, rel=1e-5)
    assert bits_per_dim(model, (x * 255).round().to(torch.uint8)) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(8, abs=0.1)  # untrained: about uniform over 256 values


@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnn_one_pixel_logits_match_the_full_pass(channels):
    """Sampling computes one pixel's logits from the rows above it; they must be the full pass's."""
    model = pixelcnn(channels)
    byte = torch.randint(256, (2, channels, 8, 8), generator=seeded(8)).float()
    full = model.net(byte)
    for i in range(8):
        for j in range(8):
            assert torch.allclose(model.net(byte, pixel=(i, j)), full[:, :, i:i + 1, j:j + 1], atol=1e-6)


def test_pixelcnn_sampling_is_seeded_and_8_bit():
    model = pixelcnn(3)
    a = model.sample(3, generator=seeded(9))
    torch.rand(5)
    assert torch.equal(a, model.sample(3, generator=seeded(9)))
    assert not torch.equal(a, model.sample(3, generator=seeded(10)))
    assert torch.equal((a * 255).round() / 255, a)


@pytest.mark.parametrize("bad", [{"hidden": 2}, {"num_layers": -1}, {"lr": 0.0}])
def test_pixelcnn_config_rejects(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PixelCNNConfig.tiny(channels=3, **bad)
