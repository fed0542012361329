"""Segmentation networks: the 2D U-Net of the ACDC literature and a 3D V-Net.

Both return a :class:`NetOutput` with the logits and the named feature maps the
M³HL feature-consistency losses tap:

- ``"low_enc"``: the encoder's feature map right after the first
  down-sampling (the paper's low-level tap, Sec. 2.3),
- ``"low_dec"``: the last decoder map before the output convolution (the
  authors' code's low-level tap),
- ``"high"``: the bottleneck (deepest encoder map; both agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class NetOutput:
    """Network output.

    Attributes:
        logits: (B, C, *spatial) unnormalised class scores.
        features: named maps, see the module docstring; (B, C_f, *spatial_f).
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor]


# ------------------------------------------------------------------- dropout
#: Keep-mask resolution of :class:`Dropout` on the CPU: the drop probability is rounded to a multiple of 1/65536.
MASK_LEVELS = 1 << 16


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Dropout's keep-mask for ``like`` on the CPU: (bool tensor of ``like``'s shape
    and memory layout, each element True with probability ``1 − p'``; ``p'``), with
    ``p`` rounded to ``p' = round(p·65536) / 65536``.

    The mask draws three 16-bit words from each 64-bit word of torch's CPU
    generator (``random_()`` on int64 fills the low 63 bits uniformly), 3× fewer
    generator calls than one 32-bit draw per element as ``torch.dropout`` does
    on the CPU, where those draws took a third of the U-Net's forward pass.
    """
    level = int(round(p * MASK_LEVELS))
    n = like.numel()
    words = torch.empty((n + 2) // 3, dtype=torch.int64, device=like.device).random_(generator=generator)
    # little-endian: int16 word 3 of each int64 holds bit 63, always 0; words 0-2 are uniform on [-32768, 32767]
    u16 = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]
    keep = u16 >= level - MASK_LEVELS // 2
    # the mask in ``like``'s physical order (e.g. channels_last), so the product runs over contiguous memory
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
    keep = keep.view([like.shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])
    return keep, level / MASK_LEVELS


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training pass draws its mask with :func:`keep_mask`
    (the same i.i.d. Bernoulli keep-mask and ``1/(1 − p)`` scaling, ``p`` rounded
    to 1/65536). Elsewhere (CUDA, eval mode, ``p`` 0 or 1) it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0 or self.inplace:
            return super().forward(x)
        keep, p = keep_mask(x, self.p)
        return x * keep * (1.0 / (1.0 - p))


# --------------------------------------------------------------------- U-Net
class _ConvBlock2d(nn.Module):
    """Two 3×3 conv + BN + LeakyReLU with dropout between them."""

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
            Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Up2d(nn.Module):
    """1×1 conv, bilinear ×2, concatenate the skip, conv block (no dropout)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.conv = _ConvBlock2d(2 * cskip, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """The 2D U-Net of the SSL4MIS/BCP lineage (about 1.81 M parameters).

    Channels 16/32/64/128/256, encoder dropout 0.05/0.1/0.2/0.3/0.5, max-pool
    down, 1×1 conv + bilinear up + skip concat in the decoder, 3×3 output conv.
    Input (B, in_channels, H, W) with any H, W (odd sizes are handled by
    resizing to the skip's size); output logits (B, num_classes, H, W).
    """

    arch = "unet2d"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError("UNet2D needs 5 channel counts and 5 dropout rates")
        self.in_channels = in_channels
        self.num_classes = num_classes
        c = channels
        self.enc = nn.ModuleList(
            [_ConvBlock2d(in_channels, c[0], dropout[0])]
            + [_ConvBlock2d(c[i - 1], c[i], dropout[i]) for i in range(1, 5)]
        )
        self.up = nn.ModuleList([_Up2d(c[4 - i], c[3 - i], c[3 - i]) for i in range(4)])
        self.out = nn.Conv2d(c[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> NetOutput:
        skips = []
        h = x
        for i, block in enumerate(self.enc):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        low_enc = skips[1]  # after the first down-sampling: (B, 32, H/2, W/2)
        high = skips[4]  # bottleneck: (B, 256, H/16, W/16)
        d = high
        for i, up in enumerate(self.up):
            d = up(d, skips[3 - i])
        logits = self.out(d)
        return NetOutput(logits, {"low_enc": low_enc, "low_dec": d, "high": high})


# --------------------------------------------------------------------- V-Net
class _ConvStage3d(nn.Module):
    """``n`` 3×3×3 conv + BN + ReLU layers (V-Net stage, no residual, as in SSL4MIS)."""

    def __init__(self, n: int, cin: int, cout: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _down3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _up3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)
    )


class VNet3D(nn.Module):
    """3D V-Net (Milletari et al.) in the form used by the LA literature.

    Base 16 channels, stages of 1/2/3/3/3 convs, strided-conv down-sampling,
    transposed-conv up-sampling with additive skips, dropout (p=0.5) on the
    bottleneck and last decoder map in training. Input (B, C, D, H, W) with
    each spatial size divisible by 16 (pad otherwise; ``inference`` does).
    """

    arch = "vnet3d"

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        b = base
        self.e1 = _ConvStage3d(1, in_channels, b)
        self.d1 = _down3d(b, 2 * b)
        self.e2 = _ConvStage3d(2, 2 * b, 2 * b)
        self.d2 = _down3d(2 * b, 4 * b)
        self.e3 = _ConvStage3d(3, 4 * b, 4 * b)
        self.d3 = _down3d(4 * b, 8 * b)
        self.e4 = _ConvStage3d(3, 8 * b, 8 * b)
        self.d4 = _down3d(8 * b, 16 * b)
        self.e5 = _ConvStage3d(3, 16 * b, 16 * b)
        self.u5 = _up3d(16 * b, 8 * b)
        self.s6 = _ConvStage3d(3, 8 * b, 8 * b)
        self.u6 = _up3d(8 * b, 4 * b)
        self.s7 = _ConvStage3d(3, 4 * b, 4 * b)
        self.u7 = _up3d(4 * b, 2 * b)
        self.s8 = _ConvStage3d(2, 2 * b, 2 * b)
        self.u8 = _up3d(2 * b, b)
        self.s9 = _ConvStage3d(1, b, b)
        self.drop = nn.Dropout3d(dropout)
        self.out = nn.Conv3d(b, num_classes, 1)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x1 = self.e1(x)
        x2 = self.e2(self.d1(x1))  # after the first down-sampling
        x3 = self.e3(self.d2(x2))
        x4 = self.e4(self.d3(x3))
        x5 = self.drop(self.e5(self.d4(x4)))
        y = self.s6(self.u5(x5) + x4)
        y = self.s7(self.u6(y) + x3)
        y = self.s8(self.u7(y) + x2)
        y = self.drop(self.s9(self.u8(y) + x1))
        return NetOutput(self.out(y), {"low_enc": x2, "low_dec": y, "high": x5})


ARCHITECTURES = {"unet2d": UNet2D, "vnet3d": VNet3D}


def build_network(arch: str, in_channels: int = 1, num_classes: int = 4) -> nn.Module:
    """Create a network by name (``"unet2d"`` or ``"vnet3d"``)."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return cls(in_channels=in_channels, num_classes=num_classes)


def network_ndim(arch: str) -> int:
    """Spatial dimensionality of an architecture (2 or 3)."""
    return 3 if arch == "vnet3d" else 2
