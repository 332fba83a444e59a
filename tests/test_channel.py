"""Channel units: fully on or off, exact zeros, residual ties, and the deployed size."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy.models import create_model
from dnr_deploy.sparsity.groups import ChannelLayout, find_channel_groups
from dnr_deploy.sparsity.policy import ChannelDNR
from dnr_deploy.sparsity.rewire import keep_top_fraction


def make(name: str, chans: int, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, 10, chans, [0.5] * chans, [0.25] * chans)
    return model, torch.zeros(1, chans, size, size)


def physically_pruned_params(model: nn.Module, layout: ChannelLayout, masks, example) -> int:
    """Count parameters after removing the off units with torch-pruning, independently of the
    layout's own arithmetic."""
    pruned = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    modules = dict(pruned.named_modules())
    for name, group in layout.groups.items():
        off = (~masks[name]).nonzero().flatten().tolist()
        if off:
            graph.get_pruning_group(modules[group.convs[0]], tp.prune_conv_out_channels,
                                    idxs=off).prune()
    return sum(p.numel() for p in pruned.parameters())


def train_steps(model, policy, optimizer, example, steps=3):
    for _ in range(steps):
        x = torch.rand(4, *example.shape[1:])
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        policy.on_step_end(model)


def test_resnet_residual_ties_are_one_unit():
    model, example = make("resnet18", 3, 32)
    groups = {g.name: g for g in find_channel_groups(model, example)}
    stage1 = groups["1.stem.0"]
    assert set(stage1.convs) == {"1.stem.0", "1.layers.0.conv2", "1.layers.1.conv2"}
    stage2 = next(g for g in groups.values() if "1.layers.2.shortcut.0" in g.convs)
    assert {"1.layers.2.conv2", "1.layers.3.conv2"} <= set(stage2.convs)
    assert all("1.fc" not in g.convs for g in groups.values())  # the classifier is never a unit


@pytest.mark.parametrize("name,chans,size", [("small", 1, 8), ("resnet18", 3, 32)])
def test_units_fully_on_or_off_and_off_units_output_zero(name, chans, size):
    model, example = make(name, chans, size)
    policy = ChannelDNR(model, 0.1, torch.Generator().manual_seed(0), example)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, policy, optimizer, example)
    policy.rewire(model, optimizer, 0.5)
    train_steps(model, policy, optimizer, example)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    outputs = {}
    hooks = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: outputs.__setitem__(n, out.detach()))
        for g in policy.layout.groups.values() for n in g.norms]
    assert any(not m.all() for m in policy.channel_masks.values())
    for mode in (True, False):
        model.train(mode)
        model(torch.rand(5, chans, size, size) * 3 - 1)  # any input, even outside [0, 1]
        for group_name, group in policy.layout.groups.items():
            on = policy.channel_masks[group_name]
            assert on.any()  # a group never loses its last unit
            for conv in group.convs:
                rows = params[f"{conv}.weight"].flatten(1)
                assert torch.count_nonzero(rows[~on]) == 0  # fully off
                assert (rows[on].abs().sum(1) > 0).all()  # fully on
            for norm in group.norms:
                assert torch.count_nonzero(params[f"{norm}.weight"][~on]) == 0
                assert torch.count_nonzero(params[f"{norm}.bias"][~on]) == 0
                assert torch.count_nonzero(outputs[norm][:, ~on]) == 0  # exactly zero out
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("name,chans,size", [("small", 1, 8), ("vgg16", 3, 32),
                                             ("resnet18", 3, 32)])
def test_reported_params_equal_the_physically_smaller_network(name, chans, size):
    model, example = make(name, chans, size)
    policy = ChannelDNR(model, 0.05, torch.Generator().manual_seed(3), example)
    layout = policy.layout
    assert layout.deployed_params(policy.channel_masks) == physically_pruned_params(
        model, layout, policy.channel_masks, example)
    # the budget: prunable weights of the shrunk net at (just under) 5% of the dense ones
    assert policy.density() <= 0.05
    assert policy.density() > 0.045


def test_channel_regrowth_explores_instead_of_undoing_its_prune():
    """Off units get no gradient, so their momentum only decays; the units a rewire prunes
    still carry momentum and would win regrowth at once. With --explore-channels they are
    excluded, so the regrown units are ones that were off: the rewire explores."""
    model, example = make("small", 1, 8)
    policy = ChannelDNR(model, 0.3, torch.Generator().manual_seed(0), example, explore=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, policy, optimizer, example, steps=3)
    before = {n: m.clone() for n, m in policy.channel_masks.items()}
    record = policy.rewire(model, optimizer, 0.5)
    grown = sum(int((policy.channel_masks[n] & ~before[n]).sum()) for n in before)
    assert grown > 0 and record["prune_fraction"] == 0.5
    assert set(record["layer_densities"]) and sum(record["regrowth_shares"].values()) == \
        pytest.approx(1.0)


def test_channel_rewire_keeps_budget_and_ties():
    model, example = make("resnet18", 3, 32)
    policy = ChannelDNR(model, 0.05, torch.Generator().manual_seed(0), example)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, policy, optimizer, example, steps=2)
    before = {n: m.clone() for n, m in policy.channel_masks.items()}
    policy.rewire(model, optimizer, 0.5)
    assert any(not torch.equal(before[n], policy.channel_masks[n]) for n in before)
    assert 0.045 < policy.density() <= 0.05
    # tied convs share one mask, so their rows switch together
    params = dict(model.named_parameters())
    stem = policy.channel_masks["1.stem.0"]
    for conv in ("1.stem.0", "1.layers.0.conv2", "1.layers.1.conv2"):
        alive = params[f"{conv}.weight"].flatten(1).abs().sum(1) > 0
        assert torch.equal(alive, stem)



def test_channel_dense_start_closes_in_on_the_budget():
    """With start_density 1.0 every unit starts on; each rewire ends at or just under the cubic
    schedule's parameter budget, and the last one lands on the target budget."""
    model, example = make("small", 1, 8)
    policy = ChannelDNR(model, 0.1, torch.Generator().manual_seed(0), example,
                        start_density=1.0)
    assert policy.density() == 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for progress in (0.25, 0.5, 1.0):
        train_steps(model, policy, optimizer, example, steps=2)
        policy.rewire(model, optimizer, 0.2, progress)
        expected = 0.1 + 0.9 * (1 - progress) ** 3
        assert expected - 0.02 < policy.density() <= expected
    params = dict(model.named_parameters())
    for conv, mask in policy.channel_masks.items():  # off units are zero
        assert params[f"{conv}.weight"][~mask].abs().sum() == 0


def test_keep_top_fraction_keeps_each_groups_most_important_units():
    """The cut keeps the same fraction of every group's active units, the most important
    ones and at least one, at the largest fraction whose count fits the budget."""
    importance = {"a": torch.arange(10.0), "b": torch.arange(4.0).flip(0)}
    masks = {"a": torch.ones(10, dtype=torch.bool), "b": torch.tensor([True, True, False, True])}
    count = lambda m: 3 * int(m["a"].sum()) + 5 * int(m["b"].sum())  # noqa: E731
    kept = keep_top_fraction(importance, masks, count, target=20)
    # a third: 4 of a's 10 (its largest) and 1 of b's 3 active; 5 of a would cost 20 + 5
    assert kept["a"].tolist() == [False] * 6 + [True] * 4
    assert kept["b"].tolist() == [True, False, False, False]
    assert count(kept) == 17
    everything = keep_top_fraction(importance, masks, count, target=10**6)
    assert all(torch.equal(everything[name], masks[name]) for name in masks)


def test_channel_shares_option_reaches_the_rewire():
    """--channel-shares cost: the rewire splits the budget by what units cost in the shrunk net,
    so the first conv (9-weight filters, but a slice of every unit of the next conv) gets more
    than its dense rows would give it, and the budget still holds."""
    from dnr_deploy.compress.training import CompressConfig, ConfigError, build_policy

    records = {}
    for shares_by in ("size", "cost"):
        config = CompressConfig(granularity="channel", channel_shares=shares_by).resolved()
        torch.manual_seed(0)  # the same network for both splits
        model, example = make("small", 1, 8)
        policy = build_policy(config, model, example)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_steps(model, policy, optimizer, example, steps=3)
        records[shares_by] = policy.rewire(model, optimizer, 0.5)["regrowth_shares"]
        assert 0.045 < policy.density() <= 0.05
    first = next(iter(records["cost"]))
    assert records["cost"][first] > records["size"][first]
    with pytest.raises(ConfigError, match="ChannelShares"):
        CompressConfig(granularity="channel", channel_shares="flops").resolved()
