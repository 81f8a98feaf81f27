"""The GenerativeModel contract, checked for every family in the registry on its
tiny() config. A new family joins by adding its line to FAMILIES; the few
family-specific promises are at the end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from gen_models.base import GenerativeModel, StepContext
from gen_models.gan.adversarial import AdversarialModel
from gen_models.gan.config import WGANConfig
from gen_models.registry import FAMILIES, build, config_class, config_dict, model_class
from gen_models.vae.config import BetaVAEConfig, VAEConfig
from gen_models.vae.vae import VAE

# (image_size, channels): the digits, Fashion-MNIST, and 32x32 RGB, the smallest size at which the
# conv families take a third resolution step (down to 4x4)
SHAPES = [(8, 1), (8, 3), (28, 1), (28, 3), (32, 3)]
LIKELIHOOD_FAMILIES = [f for f in FAMILIES if model_class(f).log_prob is not GenerativeModel.log_prob]
ADVERSARIAL_FAMILIES = [f for f in FAMILIES if issubclass(model_class(f), AdversarialModel)]


def recipe(family: str) -> dict:
    """The training-recipe options of gen_models.gan.adversarial that `family` takes, switched on; all
    but the hinge loss, which leaves D's output bias still on a first step (test_gan_recipe.py)."""
    on = {"ema_decay": 0.9, "spectral_norm": True, "d_lr": 3e-4, "betas": (0.0, 0.99)}
    if issubclass(config_class(family), WGANConfig):  # a critic has no augmentation here
        return on
    return {**on, "augment": ("color", "translation", "cutout")}


# (family, config overrides): every family on its tiny() config, and every GAN with its whole recipe on
CASES = ([pytest.param(f, {}, id=f) for f in FAMILIES]
         + [pytest.param(f, recipe(f), id=f"{f}-recipe") for f in ADVERSARIAL_FAMILIES])


def make(family: str, image_size: int = 8, channels: int = 1, **overrides) -> GenerativeModel:
    cls, cfg_cls = model_class(family), config_class(family)
    return cls(cfg_cls.tiny(image_size=image_size, channels=channels, **overrides))


def random_batch(model: GenerativeModel, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    return torch.rand(n, c.channels, c.image_size, c.image_size), torch.randint(c.num_classes, (n,))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FakeDDP(nn.Module):
    """Adds the `.module` level DDP adds, and counts the calls that go through it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


# --- configs ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_builds_and_survives_json(family):
    model = build(family)
    cfg_cls = config_class(family)
    assert isinstance(model.config, cfg_cls)
    # The pipeline stores configs as JSON next to the weights.
    assert cfg_cls(**json.loads(json.dumps(config_dict(model.config)))) == model.config


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", [{"image_size": 30}, {"image_size": 4}, {"channels": 2}, {"num_classes": 0}])
def test_every_config_rejects_bad_data_shape(family, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        config_class(family).tiny(**bad)


@pytest.mark.parametrize("family, bad", [
    ("dcgan", {"z_dim": 0}), ("dcgan", {"g_channels": 0}), ("dcgan", {"d_channels": -1}),
    ("dcgan", {"lr": 0.0}), ("dcgan", {"betas": (0.5, 1.0)}), ("dcgan", {"betas": (0.5,)}),
    ("vae", {"encoder": "rnn"}), ("vae", {"hidden": 0}), ("vae", {"z_dim": 0}), ("vae", {"beta": 0.0}),
    ("vae", {"kl_warmup_steps": -1}), ("vae", {"lr": -1e-3}),
])
def test_config_rejects_bad_values(family, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        config_class(family).tiny(**bad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", [{"bogus": 1}, {"num_classes": "ten"}, {"image_size": 30}])
def test_build_from_a_dict_validates_it(family, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build(family, bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_frozen(family):
    config = config_class(family).tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_size = 32
    assert dataclasses.replace(config, image_size=32).image_size == 32
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(config, image_size=30)


# --- sampling --------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_size, channels", SHAPES)
def test_sample_shape_dtype_range(family, image_size, channels):
    model = make(family, image_size, channels)
    x = model.sample(5)
    assert x.shape == (5, channels, image_size, image_size)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.min() >= 0 and x.max() <= 1
    assert x.std() > 0  # not a constant image


@pytest.mark.parametrize("family, overrides", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_sample_leaves_the_mode_as_it_was(family, overrides, training):
    model = make(family, **overrides).train(training)
    model.sample(2)
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("family, overrides", CASES)
def test_sample_is_determined_by_the_generator(family, overrides):
    model = make(family, 8, 3, **overrides)
    a = model.sample(4, generator=seeded(1))
    torch.rand(10)  # moving the global RNG must not matter
    assert torch.equal(a, model.sample(4, generator=seeded(1)))
    assert not torch.equal(a, model.sample(4, generator=seeded(2)))


# --- training --------------------------------------------------------------

@pytest.mark.parametrize("family, overrides", CASES)
def test_optimizers_cover_every_parameter_once(family, overrides):
    model = make(family, **overrides)
    params = [p for opt in model.configure_optimizers().values() for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("family, overrides", CASES)
@pytest.mark.parametrize("image_size, channels", SHAPES)
def test_training_step_is_finite_and_moves_every_optimizer(family, overrides, image_size, channels):
    model = make(family, image_size, channels, **overrides)
    optimizers = model.configure_optimizers()
    before = {name: [p.detach().clone() for g in opt.param_groups for p in g["params"]]
              for name, opt in optimizers.items()}

    metrics = model.training_step(random_batch(model), StepContext(optimizers=optimizers))

    assert metrics
    for key, value in metrics.items():
        assert torch.isfinite(torch.as_tensor(value)).all(), key
        assert not (isinstance(value, torch.Tensor) and value.requires_grad), f"{key} keeps its graph"
    for name, opt in optimizers.items():
        after = [p for g in opt.param_groups for p in g["params"]]
        unchanged = [i for i, (b, p) in enumerate(zip(before[name], after)) if torch.equal(b, p)]
        assert not unchanged, f"optimizer {name!r} left parameters {unchanged} as they were"


@pytest.mark.parametrize("family, overrides", CASES)
def test_training_calls_the_wrapped_modules(family, overrides):
    """The trainer swaps ddp_modules() for DDP wrappers: a model that kept a
    reference to the bare module would silently skip the gradient all-reduce."""
    model = make(family, **overrides)
    optimizers = model.configure_optimizers()  # built before wrapping, as the trainer does
    model.wrap_ddp(FakeDDP)
    wrappers = model.ddp_modules()
    assert wrappers and all(isinstance(w, FakeDDP) for w in wrappers.values())
    before = [p.detach().clone() for p in model.parameters()]

    model.training_step(random_batch(model), StepContext(optimizers=optimizers))

    assert all(w.calls > 0 for w in wrappers.values()), {n: w.calls for n, w in wrappers.items()}
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- checkpoints -----------------------------------------------------------

@pytest.mark.parametrize("family, overrides", CASES)
@pytest.mark.parametrize("wrap", [None, lambda m: m, FakeDDP], ids=["bare", "identity", "fake_ddp"])
def test_checkpoint_round_trip(family, overrides, wrap):
    model = make(family, 8, 3, **overrides)
    model.training_step(random_batch(model), StepContext(optimizers=model.configure_optimizers()))
    model.on_step_end(7)  # move any step-driven state off its initial value
    if wrap is not None:
        model.wrap_ddp(wrap)
    if wrap is FakeDDP:
        assert any(".module." in k for k in model.state_dict())  # the level plain_state_dict must strip

    state = model.plain_state_dict()
    fresh = make(family, 8, 3, **overrides)
    assert sorted(state) == sorted(fresh.state_dict())
    fresh.load_state_dict(state)

    for a, b in zip(model.plain_state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(model.sample(4, generator=seeded(3)), fresh.sample(4, generator=seeded(3)))


# --- likelihood --------------------------------------------------------------

@pytest.mark.parametrize("family", LIKELIHOOD_FAMILIES)
@pytest.mark.parametrize("image_size, channels", SHAPES)
def test_log_prob_is_finite_per_image(family, image_size, channels):
    model = make(family, image_size, channels)
    assert model.has_log_prob
    x, _ = random_batch(model, n=6)
    lp = model.log_prob(x)
    assert lp.shape == (6,)
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(LIKELIHOOD_FAMILIES)))
def test_no_log_prob_says_so(family):
    model = make(family)
    assert not model.has_log_prob
    with pytest.raises(NotImplementedError):
        model.log_prob(random_batch(model)[0])


# --- family-specific promises ------------------------------------------------

def stride_2_convs(net: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2) for m in net.modules())


@pytest.mark.parametrize("image_size, steps", [(8, 2), (12, 2), (28, 2), (32, 3), (48, 3), (64, 4)])
def test_conv_nets_halve_the_image_down_to_a_small_map(image_size, steps):
    """Depth follows the image: stride-2 steps down to a 4x4 map (the DCGAN paper's start) while the
    map halves that far, two at least: 8 -> 2x2 and 28 -> 7x7 keep the nets they were tuned with."""
    side = image_size // 2**steps
    dcgan, stylegan, conv_vae, ebm = (make(f, image_size, 3) for f in ("dcgan", "stylegan", "conv_vae", "ebm"))
    for net in (dcgan.generator, dcgan.discriminator, stylegan.discriminator, conv_vae.encoder, conv_vae.decoder,
                ebm.energy):
        assert stride_2_convs(net) == steps
    assert dcgan.generator[1].kernel_size == dcgan.discriminator[-2].kernel_size == (side, side)
    assert stylegan.generator.const.shape[-2:] == (side, side)
    assert stylegan.generator.num_layers == 1 + 2 * steps  # a conv at the constant, two per doubling
    ddpm = make("ddpm", image_size, 3, channel_mults=None)
    assert ddpm.config.unet_channel_mults == (1,) + (2,) * steps
    assert stride_2_convs(ddpm.unet) == 2 * steps  # down and back up
    assert make("ddpm", image_size, 3).config.unet_channel_mults == (1, 2)  # a given channel_mults stays

    x = torch.rand(2, 3, image_size, image_size)
    assert dcgan.discriminator(x).shape == stylegan.discriminator(x).shape == ebm.energy(x).shape == (2,)
    assert dcgan.sample(2).shape == stylegan.sample(2).shape == conv_vae.sample(2).shape == x.shape
    assert ddpm.unet(x, torch.zeros(2, dtype=torch.long)).shape == x.shape


def test_dcgan_metrics_are_the_documented_ones():
    model = make("dcgan")
    metrics = model.training_step(random_batch(model), StepContext(optimizers=model.configure_optimizers()))
    assert set(metrics) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert 0 < float(metrics["d_real"]) < 1 and 0 < float(metrics["d_fake"]) < 1


def test_vae_log_prob_ignores_beta_and_warmup():
    """log_prob is the true bound; beta and the warm-up only weight the training loss."""
    beta = VAE(BetaVAEConfig.tiny(image_size=8, kl_warmup_steps=100))
    plain = VAE(VAEConfig.tiny(image_size=8))
    plain.load_state_dict(beta.state_dict())
    x, y = random_batch(beta, n=8)

    def under_seed(fn):
        torch.manual_seed(5)
        return fn()

    assert torch.equal(under_seed(lambda: beta.log_prob(x)), under_seed(lambda: plain.log_prob(x)))
    loss_beta, m = under_seed(lambda: beta.loss((x, y), step=50))  # KL weight 4 * 50/100 = 2
    loss_plain, _ = under_seed(lambda: plain.loss((x, y), step=50))
    assert m["kl"] > 0.01
    assert torch.allclose(loss_beta - loss_plain, m["kl"], atol=1e-4)  # weight 2 against weight 1


def test_vae_kl_warmup_follows_the_step():
    """The weight is read from the step `loss` is given, which the trainer restores from a
    checkpoint: a resumed run weights its first loss as the run it continues would have,
    with nothing of the warm-up in the model's state."""
    model = VAE(BetaVAEConfig.tiny(beta=4.0, kl_warmup_steps=100))
    assert model.kl_weight(0) == 0.0
    assert model.kl_weight(25) == pytest.approx(1.0)
    assert model.kl_weight(1000) == pytest.approx(4.0)
    assert VAE(VAEConfig.tiny(beta=1.0)).kl_weight(0) == 1.0  # no warm-up: beta from step 0

    resumed = VAE(BetaVAEConfig.tiny(beta=4.0, kl_warmup_steps=100))
    resumed.load_state_dict(model.plain_state_dict())
    x, y = random_batch(model, n=8)
    loss, m = resumed.loss((x, y), step=25)
    assert torch.allclose(loss, m["recon"] + 1.0 * m["kl"], atol=1e-4)
    assert "steps_done" not in model.state_dict()


def test_vae_loads_a_checkpoint_from_before_the_step_reached_loss():
    """Checkpoints of that time carry a steps_done buffer; every load is strict."""
    model = VAE(VAEConfig.tiny())
    old = {**model.state_dict(), "steps_done": torch.tensor(7)}
    fresh = VAE(VAEConfig.tiny())
    fresh.load_state_dict(old)
    assert "steps_done" in old  # the caller's dict is left as it was
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_vae_importance_samples_tighten_the_bound():
    model = VAE(VAEConfig.tiny())
    x, _ = random_batch(model, n=32)
    elbo = torch.stack([model.log_prob(x) for _ in range(64)]).mean(0)
    iwae = model.log_prob(x, importance_samples=64)
    assert iwae.shape == (32,) and torch.isfinite(iwae).all()
    # E[IWAE_K] >= ELBO (Burda et al. 2016); averaged over 32 images the gap is well above the noise
    assert iwae.mean() > elbo.mean()
    with pytest.raises(ValueError, match="importance_samples"):
        model.log_prob(x, importance_samples=0)

