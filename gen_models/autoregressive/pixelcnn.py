"""PixelCNN (van den Oord et al. 2016): an autoregressive model of 8-bit images.

    p(x) = prod over pixels i in raster order, colours R, G, B within a pixel:
           p(x_{i,c} | x_{<i}, x_{i,<c}),   each a 256-way softmax

    7x7 mask-A conv -> num_layers residual blocks of mask-B convs -> ReLU, 1x1, ReLU, 1x1 -> 256 * C logits

Mask A hides a pixel's own value from its prediction, mask B lets later layers
use what the earlier ones computed at that position (gen_models/nn/masked_conv.py).
RGB is modelled, not refused: every channel of every layer belongs to a colour,
and the masks order the colours within a pixel. It costs only the centre tap
of each mask, and keeps the family usable wherever ModelConfig accepts
channels = 3 (the contract suite builds every family in RGB).

The stacked masks leave the blind spot of the original PixelCNN (some pixels
up and to the right are never seen); the gated PixelCNN's two stacks would remove it.

All of one image's conditionals come out of a single pass (training is
parallel); sampling runs the net once per pixel and colour.
Unconditional: `sample` ignores labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.autoregressive.config import PixelCNNConfig
from gen_models.base import Batch, GenerativeModel, Metrics
from gen_models.nn.masked_conv import MaskedConv2d


class MaskedResidualBlock(nn.Module):
    """h + 1x1_B(relu(3x3_B(relu(h)))): mask B throughout, so the block never looks ahead."""

    def __init__(self, width: int, colours: int):
        super().__init__()
        self.conv = MaskedConv2d(width, width, 3, mask_type="B", colours=colours)
        self.proj = MaskedConv2d(width, width, 1, mask_type="B", colours=colours)

    def forward(self, h: Tensor) -> Tensor:
        # The identity path keeps channel k on colour k % colours: the ordering survives.
        return h + self.proj(F.relu(self.conv(F.relu(h))))


class PixelCNNNet(nn.Module):
    """Bytes (N, C, H, W), as floats 0..255 -> logits (N, 256 * C, H, W).

    Output channel v * C + c is the logit of value v for colour c, so it
    belongs to colour (v * C + c) % C = c, as the masks require.
    """

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        c, h = config.channels, config.hidden
        self.body = nn.Sequential(
            MaskedConv2d(c, h, 7, mask_type="A", colours=c),
            *[MaskedResidualBlock(h, c) for _ in range(config.num_layers)],
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            MaskedConv2d(h, h, 1, mask_type="B", colours=c),
            nn.ReLU(),
            MaskedConv2d(h, 256 * c, 1, mask_type="B", colours=c),
        )

    def forward(self, byte: Tensor, *, pixel: tuple[int, int] | None = None) -> Tensor:
        """All logits, or with `pixel` = (i, j) only that pixel's, (N, 256 * C, 1, 1).

        The pixel's logits are exact from the rows up to i alone (no mask looks
        down) and from the body's features at (i, j) alone (the head is 1x1):
        sampling, one pass per value, skips most of the work this way. The
        widest layer, 256 * C channels, would otherwise dominate every pass.
        """
        x = byte / 127.5 - 1  # centred: the first layer starts from inputs of mean ~0
        if pixel is None:
            return self.head(self.body(x))
        i, j = pixel
        return self.head(self.body(x[:, :, :i + 1])[:, :, i:, j:j + 1])


class PixelCNN(GenerativeModel):
    primary_metric = ("bits_per_dim", "min")

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        self.net = PixelCNNNet(config)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"pixelcnn": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [0, 1] -> (logits (N, 256, C, H, W), the bytes round(255 x) as int64 (N, C, H, W))."""
        byte = (x * 255).round()
        n, c, s, _ = x.shape
        return self.net(byte).view(n, 256, c, s, s), byte.long()

    def loss(self, batch: Batch, *, step: int = 0) -> tuple[Tensor, Metrics]:
        logits, byte = self.logits(batch[0])
        loss = F.cross_entropy(logits, byte)  # mean over N, C, H, W: nats per dimension
        return loss, {"bits_per_dim": loss.detach() / math.log(2)}

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        """log P(bytes) + D ln 256, in nats per image, shape (N,).

        P(bytes) is exact and discrete, and its bits/dim is -log2 P / D with
        no +8. The contract, and pipelines.evaluate.bits_per_dim's +8, want a
        density on [0, 1]^D: spread each byte's probability uniformly over its
        bin of width 1/256 per dimension, which divides it by 256^-D, i.e. adds
        D ln 256. Then -log_prob / (D ln 2) + 8 = -log2 P / D exactly, and
        bits/dim means the same for this family as for the flows.
        """
        logits, byte = self.logits(x)
        log_p = -F.cross_entropy(logits, byte, reduction="none").flatten(1).sum(1)
        return log_p + byte[0].numel() * math.log(256)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Pixel by pixel in raster order, R then G then B within a pixel; each
        value drawn from its softmax by `generator` when given."""
        c, s = self.config.channels, self.config.image_size
        byte = torch.zeros(n, c, s, s, device=next(self.parameters()).device)
        for i in range(s):
            for j in range(s):
                for k in range(c):
                    # values not drawn yet stay 0, and no mask lets the net see them
                    probs = self.net(byte, pixel=(i, j)).view(n, 256, c)[:, :, k].softmax(dim=1)
                    if generator is not None:  # multinomial draws on the generator's device
                        v = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(byte.device)
                    else:
                        v = torch.multinomial(probs, 1)
                    byte[:, k, i, j] = v[:, 0].float()
        return byte / 255

    def sampling_cost(self) -> tuple[str, int]:
        c = self.config
        return "autoregressive", c.channels * c.image_size ** 2
