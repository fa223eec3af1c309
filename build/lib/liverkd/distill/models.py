"""One configurable 3-D U-Net and named presets over it (timm's create_model idea)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    """Channels per level, shallowest first; depth = len(widths)."""
    in_channels: int = 1
    n_classes: int = 2
    convs_per_level: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{**d, "widths": tuple(d["widths"])})


PRESETS: dict[str, UNetConfig] = {
    "teacher": UNetConfig(widths=(16, 32, 64, 128)),
    "ta": UNetConfig(widths=(8, 16, 32, 64)),
    "student-100k": UNetConfig(widths=(4, 8, 17, 34)),
    "student-30k": UNetConfig(widths=(2, 4, 9, 18)),
}


def conv_block(cin: int, cout: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [
            nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """3-D U-Net: conv-BN-ReLU blocks, max-pool down, transpose-conv up, skip by concat."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        w = config.widths
        n = config.convs_per_level
        self.down = nn.ModuleList()
        cin = config.in_channels
        for cout in w:
            self.down.append(conv_block(cin, cout, n))
            cin = cout
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(len(w) - 1)))
        self.dec = nn.ModuleList(conv_block(2 * w[i], w[i], n) for i in reversed(range(len(w) - 1)))
        self.head = nn.Conv3d(w[0], config.n_classes, 1)
        # Zero, not PyTorch's uniform(+-1/sqrt(fan_in)) (+-0.7 per class at the 30k student's 2
        # channels) nor the class prior (RetinaNet's init, Lin et al. 2017): a random bias leaves
        # the sign of the starting liver margin to chance, and the prior starts at the empty mask
        # that KD collapsed into. At zero no class is favoured; the losses decide (docs/method.md).
        nn.init.zeros_(self.head.bias)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


def create_model(name_or_config: str | UNetConfig | dict) -> UNet3D:
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise ValueError(f"unknown preset {name_or_config!r}; choose from {sorted(PRESETS)}")
        return UNet3D(PRESETS[name_or_config])
    if isinstance(name_or_config, dict):
        return UNet3D(UNetConfig.from_dict(name_or_config))
    return UNet3D(name_or_config)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
