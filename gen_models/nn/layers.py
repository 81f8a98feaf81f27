"""Convolutional building blocks shared by the image families.

The convolutional families go from image_size down to a small map in
`resolution_steps` (gen_models.config) stride-2 steps (the UNet's levels follow the same rule),
so one pair of resampling convolutions serves the GAN nets, the convolutional
VAE, the EBM and the UNet, and the size at the bottom is plain arithmetic:
image_size // 2**steps.
"""

from torch import nn


def downsample(c_in: int, c_out: int, *, bias: bool = True) -> nn.Conv2d:
    """4x4 conv, stride 2, padding 1: halves any even size exactly (28 -> 14 -> 7).

    Pass bias=False when a BatchNorm follows: its shift makes the bias redundant.
    """
    return nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=bias)


def upsample(c_in: int, c_out: int, *, bias: bool = True) -> nn.ConvTranspose2d:
    """The transpose of `downsample`: doubles any size exactly (7 -> 14 -> 28).

    A kernel size divisible by the stride overlaps evenly, so it does not
    leave the checkerboard pattern a 3x3 kernel at stride 2 does (Odena et al. 2016).
    """
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=bias)


def dcgan_init_(module: nn.Module) -> None:
    """Weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0 (Radford et al. 2015).

    The GAN families start from the paper's init rather than PyTorch's default,
    so that their published hyperparameters (lr 2e-4, beta1 0.5) carry over.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
