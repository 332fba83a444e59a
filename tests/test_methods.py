"""The baselines plug into the same loop: static masks never move, magnitude prunes once."""

import pytest
import torch
from torch import nn

from dnr_deploy.compress.training import CompressConfig, ConfigError, build_policy
from dnr_deploy.models import create_model
from dnr_deploy.sparsity.masks import global_magnitude_masks
from dnr_deploy.sparsity.policy import MagnitudePrune, StaticChannels, StaticSparse


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))


def step(model, optimizer, policy):
    loss = nn.functional.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 4, (8,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    policy.on_step_end(model)


def test_global_magnitude_keeps_the_largest_weights_across_layers():
    weights = {"a": torch.tensor([0.1, -5.0, 0.2]), "b": torch.tensor([[3.0, -0.01], [0.3, 4.0]])}
    masks = global_magnitude_masks(weights, 3 / 7)
    assert torch.equal(masks["a"], torch.tensor([False, True, False]))
    assert torch.equal(masks["b"], torch.tensor([[True, False], [False, True]]))


def test_static_masks_never_move():
    model = tiny_model()
    policy = StaticSparse(model, 0.1, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {n: m.clone() for n, m in policy.masks.items()}
    for epoch in range(3):
        step(model, optimizer, policy)
        policy.on_epoch_end(model, optimizer, epoch, 4)
        assert policy.rewire(model, optimizer, 0.5) == {}  # the schedule's calls do nothing
    assert all(torch.equal(before[n], policy.masks[n]) for n in before)
    assert policy.density() == pytest.approx(0.1, abs=1e-3)


def test_magnitude_is_dense_for_half_then_prunes_once_and_holds():
    model = tiny_model()
    policy = MagnitudePrune(model, 0.1, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    densities = []
    for epoch in range(5):
        step(model, optimizer, policy)
        densities.append(policy.density())
        policy.on_epoch_end(model, optimizer, epoch, 6)
    assert densities[:3] == [1.0, 1.0, 1.0]  # dense through epoch 3 of 6
    assert densities[3] == pytest.approx(0.1, abs=1e-3) == densities[4]
    params = dict(model.named_parameters())
    for name, mask in policy.masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0


def test_magnitude_is_irregular_only_and_static_channels_never_move():
    with pytest.raises(ConfigError, match="irregular"):
        CompressConfig(method="magnitude", granularity="channel").resolved()
    config = CompressConfig(method="static", granularity="channel").resolved()
    model = create_model("small", 10, 1, [0.3], [0.4])
    policy = build_policy(config, model, torch.zeros(1, 1, 8, 8))
    assert isinstance(policy, StaticChannels) and 0.045 < policy.density() <= 0.05
    before = {n: m.clone() for n, m in policy.channel_masks.items()}
    assert policy.rewire(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5) == {}
    assert all(torch.equal(before[n], policy.channel_masks[n]) for n in before)
    with pytest.raises(ConfigError, match="unknown method"):
        CompressConfig(method="lottery").resolved()
