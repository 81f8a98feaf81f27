"""Family name -> (model class, config class). One explicit dict: adding a
family means adding a line here, and the contract suite picks it up.

The configs are imported here, a model class only when it is asked for
(`model_class`): the CLI and the pipeline's driver validate a spec's model
section without importing torch, which costs about 2 s of every command."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING, Any

from gen_models.autoregressive.config import PixelCNNConfig
from gen_models.config import ModelConfig
from gen_models.diffusion.config import DDPMConfig
from gen_models.ebm.config import EBMConfig
from gen_models.flow.config import RealNVPConfig
from gen_models.gan.config import (
    CGANConfig,
    DCGANConfig,
    GANConfig,
    StyleGANConfig,
    WGANConfig,
    WGANGPConfig,
)
from gen_models.vae.config import BetaVAEConfig, ConvVAEConfig, VAEConfig

if TYPE_CHECKING:
    from gen_models.base import GenerativeModel

# family -> ("module:ModelClass", config class)
FAMILIES: dict[str, tuple[str, type[ModelConfig]]] = {
    "gan": ("gen_models.gan.gan:GAN", GANConfig),
    "cgan": ("gen_models.gan.cgan:CGAN", CGANConfig),
    "dcgan": ("gen_models.gan.dcgan:DCGAN", DCGANConfig),
    "wgan": ("gen_models.gan.wgan:WGAN", WGANConfig),
    "wgan_gp": ("gen_models.gan.wgan:WGAN", WGANGPConfig),
    "stylegan": ("gen_models.gan.stylegan:StyleGAN", StyleGANConfig),
    "vae": ("gen_models.vae.vae:VAE", VAEConfig),
    "conv_vae": ("gen_models.vae.vae:VAE", ConvVAEConfig),
    "beta_vae": ("gen_models.vae.vae:VAE", BetaVAEConfig),
    "ddpm": ("gen_models.diffusion.ddpm:DDPM", DDPMConfig),
    "realnvp": ("gen_models.flow.realnvp:RealNVP", RealNVPConfig),
    "pixelcnn": ("gen_models.autoregressive.pixelcnn:PixelCNN", PixelCNNConfig),
    "ebm": ("gen_models.ebm.ebm:EBM", EBMConfig),
}


def _known(family: str) -> None:
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")


def config_class(family: str) -> type[ModelConfig]:
    _known(family)
    return FAMILIES[family][1]


@functools.cache
def model_class(family: str) -> type[GenerativeModel]:
    _known(family)
    module, name = FAMILIES[family][0].split(":")
    return getattr(importlib.import_module(module), name)


def build(family: str, config: ModelConfig | dict[str, Any] | None = None) -> GenerativeModel:
    """The model of `family` from a config object or a dict of its fields."""
    cfg_cls = config_class(family)
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = cfg_cls(**config)
    return model_class(family)(config)


def config_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
