"""Builders the tests share (instead of importing each other's helpers)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics, so the exporter's BN folding is really exercised."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))
