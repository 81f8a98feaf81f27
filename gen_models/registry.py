"""Family name -> (model class, config class). One explicit dict: adding a
family means adding a line here, and the contract suite picks it up."""

from __future__ import annotations

import dataclasses
from typing import Any

from gen_models.autoregressive.pixelcnn import PixelCNN, PixelCNNConfig
from gen_models.base import GenerativeModel
from gen_models.config import ModelConfig
from gen_models.diffusion.ddpm import DDPM, DDPMConfig
from gen_models.ebm.ebm import EBM, EBMConfig
from gen_models.flow.realnvp import RealNVP, RealNVPConfig
from gen_models.gan.cgan import CGAN, CGANConfig
from gen_models.gan.dcgan import DCGAN, DCGANConfig
from gen_models.gan.gan import GAN, GANConfig
from gen_models.gan.stylegan import StyleGAN, StyleGANConfig
from gen_models.gan.wgan import WGAN, WGANConfig, WGANGPConfig
from gen_models.vae.vae import VAE, BetaVAEConfig, ConvVAEConfig, VAEConfig

FAMILIES: dict[str, tuple[type[GenerativeModel], type[ModelConfig]]] = {
    "gan": (GAN, GANConfig),
    "cgan": (CGAN, CGANConfig),
    "dcgan": (DCGAN, DCGANConfig),
    "wgan": (WGAN, WGANConfig),
    "wgan_gp": (WGAN, WGANGPConfig),
    "stylegan": (StyleGAN, StyleGANConfig),
    "vae": (VAE, VAEConfig),
    "conv_vae": (VAE, ConvVAEConfig),
    "beta_vae": (VAE, BetaVAEConfig),
    "ddpm": (DDPM, DDPMConfig),
    "realnvp": (RealNVP, RealNVPConfig),
    "pixelcnn": (PixelCNN, PixelCNNConfig),
    "ebm": (EBM, EBMConfig),
}


def config_class(family: str) -> type[ModelConfig]:
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family][1]


def build(family: str, config: ModelConfig | dict[str, Any] | None = None) -> GenerativeModel:
    """The model of `family` from a config object or a dict of its fields."""
    cfg_cls = config_class(family)
    cls = FAMILIES[family][0]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = cfg_cls(**config)
    return cls(config)


def config_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
