"""A user's own model for the bring-your-own-model tests: two conv branches added together,
built by a `MODULE:FACTORY` spec (`tests.byo_example:two_branch`)."""

import torch
from torch import nn


class TwoBranch(nn.Module):
    """A 3x3 and a 1x1 branch summed: the addition ties their output channels into one unit."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.wide = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16))
        self.narrow = nn.Sequential(nn.Conv2d(in_chans, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.wide(x) + self.narrow(x))


def two_branch(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return TwoBranch(num_classes, in_chans)


def not_a_module(num_classes: int = 10, in_chans: int = 3) -> str:
    return "a string"


class AuxiliaryHead(nn.Module):
    """Returns (logits, auxiliary logits) in training mode, as GoogLeNet does."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor):
        logits = self.head(x)
        return (logits, logits) if self.training else logits


def auxiliary_head(num_classes: int, in_chans: int) -> nn.Module:
    return AuxiliaryHead(num_classes)


class Concatenated(nn.Module):
    """Two branches of different widths concatenated behind one batch norm, as in DenseNet."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_chans, 24, 3, padding=1)
        self.b = nn.Conv2d(in_chans, 40, 1)
        self.bn = nn.BatchNorm2d(64)
        self.mix = nn.Conv2d(64, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))
        return self.fc(torch.relu(x).mean(dim=(2, 3)))


def concatenated(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return Concatenated(num_classes, in_chans)
