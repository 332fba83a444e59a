"""Issue 11: the step-based rewire schedule, size-aware redistribution, Dettmers' dense-layer
rule, ERK initial densities, and channel regrowth that explores."""

import pytest
import torch
from torch import nn

from dnr_deploy.models import create_model
from dnr_deploy.sparsity.masks import Init, erk_densities, random_masks
from dnr_deploy.sparsity.policy import ChannelDNR, StaticChannel
from dnr_deploy.sparsity.rewire import (
    Redistribution,
    RewireSchedule,
    layer_prune_fractions,
    rewire_channels,
    rewire_irregular,
)
from dnr_deploy.training import CompressConfig, ConfigError, build_policy


def test_schedule_is_a_pure_function_of_step_counters():
    schedule = RewireSchedule(every=50, initial=0.3, until=0.75)
    due = [s for s in range(1, 461) if schedule.due(s, 460)]
    assert due == [50, 100, 150, 200, 250, 300]  # 345 = 0.75 * 460 freezes the topology
    # the same steps whatever the epoch length: 23 or 391 steps an epoch, same total
    assert schedule.fraction(50, 460) == pytest.approx(0.15 * (1 + torch.cos(
        torch.tensor(torch.pi * 50 / 345)).item()))
    again = RewireSchedule(every=50, initial=0.3, until=0.75)
    assert [again.due(s, 460) for s in range(461)] == [schedule.due(s, 460) for s in range(461)]
    assert not schedule.due(0, 460)


def test_counts_exact_after_rewire_for_every_redistribution():
    torch.manual_seed(0)
    weights = {"a": torch.randn(40, 30), "b": torch.randn(200, 50), "c": torch.randn(10, 8)}
    masks = random_masks(weights, 0.1, torch.Generator().manual_seed(0))
    momenta = {n: torch.randn_like(w) for n, w in weights.items()}
    total = sum(int(m.sum()) for m in masks.values())
    for mode in Redistribution:
        rewired, shares = rewire_irregular(weights, momenta, masks, 0.3, mode)
        assert sum(int(m.sum()) for m in rewired.values()) == total
        assert sum(shares.values()) == pytest.approx(1.0)
        if mode is Redistribution.NONE:
            assert all(int(rewired[n].sum()) == int(masks[n].sum()) for n in masks)


def test_size_aware_redistribution_gives_large_layers_a_proportionate_share():
    # same per-weight momentum everywhere; "big" holds 10x the active weights of "small"
    weights = {"small": torch.ones(100), "big": torch.ones(1000)}
    masks = {"small": torch.arange(100) < 10, "big": torch.arange(1000) < 100}
    momenta = {n: torch.full_like(w, 0.5) for n, w in weights.items()}
    mean_split, _ = rewire_irregular(weights, momenta, masks, 0.5, Redistribution.MEAN)
    total_split, shares = rewire_irregular(weights, momenta, masks, 0.5, Redistribution.MOMENTUM)
    assert shares["big"] == pytest.approx(10 / 11)
    assert int(total_split["big"].sum()) == 100 and int(total_split["small"].sum()) == 10
    # the mean split gives both halves of the 55 freed: the big layer shrinks 100 -> 77
    assert int(mean_split["big"].sum()) < 80


def test_dettmers_rule_spares_a_nearly_dense_growing_layer():
    masks = {"dense": torch.arange(100) < 95, "sparse": torch.arange(1000) < 50}
    fractions = layer_prune_fractions(masks, {"dense": 0.7, "sparse": 0.3}, 0.5)
    assert fractions["dense"] == pytest.approx(0.05)  # at most its fraction of zeros
    assert fractions["sparse"] == 0.5
    # below-average share: the dense layer is pruned like any other
    assert layer_prune_fractions(masks, {"dense": 0.3, "sparse": 0.7}, 0.5)["dense"] == 0.5


def test_erk_densities_favour_small_layers_and_keep_the_global_budget():
    shapes = {"conv1": torch.Size([32, 1, 3, 3]), "conv4": torch.Size([128, 128, 3, 3]),
              "fc": torch.Size([10, 128])}
    layer = erk_densities(shapes, 0.05)
    sizes = {n: torch.Size(s).numel() for n, s in shapes.items()}
    assert layer["conv1"] == 1.0  # tiny first conv is kept dense
    assert layer["fc"] > layer["conv4"]
    budget = sum(layer[n] * sizes[n] for n in shapes)
    assert budget == pytest.approx(0.05 * sum(sizes.values()))
    weights = {n: torch.zeros(s) for n, s in shapes.items()}
    masks = random_masks(weights, 0.05, torch.Generator().manual_seed(0), Init.ERK)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * sum(sizes.values()))
    assert int(masks["conv1"].sum()) == sizes["conv1"]


def test_channel_regrowth_explores_units_that_were_off_for_a_while():
    # 8 units, 4 on; the unit pruned now (3) still has momentum, the long-off ones (4..7) none
    masks = {"g": torch.tensor([True, True, True, True, False, False, False, False])}
    importance = {"g": torch.tensor([4.0, 3.0, 2.0, 1.0, 0, 0, 0, 0])}
    momentum = {"g": torch.tensor([[1.0], [1.0], [1.0], [5.0], [0.0], [0.0], [0.0], [0.0]])}
    rewired, _ = rewire_channels(importance, momentum, masks, 0.25, lambda m: int(m["g"].sum()),
                                 4, torch.Generator().manual_seed(0))
    on = rewired["g"]
    assert int(on.sum()) == 4 and not on[3]  # the just-pruned unit does not come straight back
    assert on[4:].sum() == 1  # a unit off since before this rewire is tried instead


def test_channel_importance_survives_batch_norm_rescaling():
    torch.manual_seed(0)
    model = create_model("small", 10, 1, [0.5], [0.25])
    policy = ChannelDNR(model, 0.5, torch.Generator().manual_seed(0), torch.zeros(1, 1, 8, 8))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    group = next(g for g in policy.layout.groups.values() if g.norms)
    before = policy.importance(params)[group.name]
    params[f"{group.convs[0]}.weight"] *= 10.0  # BN cancels a filter's scale...
    params[f"{group.norms[0]}.weight"] /= 10.0  # ...what matters is gamma
    assert torch.allclose(policy.importance(params)[group.name], before, rtol=1e-4)


def test_static_channel_never_rewires_and_config_reaches_the_policy():
    config = CompressConfig(method="static", granularity="channel", density=0.3)
    model = create_model("small", 10, 1, [0.5], [0.25])
    policy = build_policy(config.resolved(), model, torch.zeros(1, 1, 8, 8))
    assert isinstance(policy, StaticChannel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert policy.on_step_end(model, optimizer, 50, 100) == {}
    dnr = build_policy(CompressConfig(rewire_every=7, prune_rate=0.2, rewire_until=0.5,
                                      redistribution="none", init="erk").resolved(),
                       model, torch.zeros(1, 1, 8, 8))
    assert dnr.schedule == RewireSchedule(7, 0.2, 0.5)
    assert dnr.redistribution is Redistribution.NONE
    with pytest.raises(ConfigError, match="available: momentum, mean, none"):
        CompressConfig(redistribution="bogus").resolved()
    with pytest.raises(ConfigError, match="rewire_until"):
        CompressConfig(rewire_until=1.5).resolved()
