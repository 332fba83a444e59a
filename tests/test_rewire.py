"""Rewiring mechanics on small hand-built layers."""

import math

import pytest
import torch
from torch import nn

from dnr_deploy.sparsity.masks import apply_masks, erk_shares, random_masks, split_budget
from dnr_deploy.sparsity.policy import IrregularDNR
from dnr_deploy.sparsity.rewire import (
    channel_cost_shares,
    normalized_momentum,
    prune_smallest,
    regrow_largest,
    regrowth_shares,
    rewire_irregular,
)
from dnr_deploy.sparsity.schedule import RewireSchedule


def test_normalized_momentum_sums_to_one_and_ignores_inactive():
    masks = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, False])}
    momenta = {"a": torch.tensor([0.2, -0.4, 100.0]), "b": torch.tensor([-0.1, 50.0, 50.0])}
    shares = normalized_momentum(momenta, masks)
    assert sum(shares.values()) == pytest.approx(1.0)
    # a: mean(|0.2|, |-0.4|) = 0.3; b: 0.1 -> 0.75, 0.25 (inactive entries ignored)
    assert shares["a"] == pytest.approx(0.75)
    assert shares["b"] == pytest.approx(0.25)


def test_prune_removes_the_smallest_magnitudes():
    weight = torch.tensor([[0.5, -0.05, 0.3], [-0.01, 0.9, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pruned = prune_smallest(weight, mask, 2)
    expected = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(pruned, expected)


def test_regrow_picks_largest_momentum_among_inactive():
    momentum = torch.tensor([9.0, 0.1, -3.0, 0.2, 2.0])
    mask = torch.tensor([True, False, False, False, False])
    grown = regrow_largest(momentum, mask, 2)
    # index 0 has the largest |momentum| but is already active: 2 (|-3|) and 4 (2.0) grow.
    assert torch.equal(grown, torch.tensor([True, False, True, False, True]))


def test_split_budget_is_proportional_and_respects_capacity():
    assert split_budget(10, {"a": 0.5, "b": 0.5}, {"a": 2, "b": 100}) == {"a": 2, "b": 8}
    assert split_budget(8, {"a": 0.75, "b": 0.25}, {"a": 100, "b": 100}) == {"a": 6, "b": 2}
    alloc = split_budget(7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 9, "b": 9, "c": 9})
    assert sum(alloc.values()) == 7 and max(alloc.values()) - min(alloc.values()) <= 1
    assert split_budget(50, {"a": 0.9, "b": 0.1}, {"a": 3, "b": 4}) == {"a": 3, "b": 4}


def two_layers() -> tuple[dict, dict, dict]:
    """Two 8-weight layers, 4 active each (values 1-4), layer a's momentum 3x layer b's."""
    weights = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0]),
               "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0])}
    masks = {name: w != 0 for name, w in weights.items()}
    momenta = {"a": torch.tensor([0.3, 0.3, 0.3, 0.3, 0.5, 0.4, 0.1, 0.2]),
               "b": torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.7, 0.0])}
    return weights, masks, momenta


def test_rewire_moves_budget_by_momentum_and_keeps_global_count():
    weights, masks, momenta = two_layers()
    rewired, shares = rewire_irregular(weights, momenta, masks, fraction=0.5)
    assert shares == pytest.approx({"a": 0.75, "b": 0.25})
    # Each layer drops its two smallest (values 1 and 2); 4 freed, 3 regrow in a, 1 in b.
    assert int(rewired["a"].sum()) == 5 and int(rewired["b"].sum()) == 3
    assert sum(int(m.sum()) for m in rewired.values()) == 8
    # a regrows the largest |momentum| inactive: 0.5, 0.4, then 0.3 at a just-pruned position.
    assert rewired["a"][4] and rewired["a"][5]
    assert rewired["b"][6]  # the 0.7 of layer b


def test_random_masks_hit_the_global_count_exactly():
    weights = {"a": torch.zeros(37, 11), "b": torch.zeros(5, 3, 3, 3), "c": torch.zeros(10)}
    masks = random_masks(weights, 0.05, torch.Generator().manual_seed(0))
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * total)


def test_schedule_is_in_steps_decays_by_cosine_and_freezes():
    schedule = RewireSchedule(every=50, initial=0.3, until=0.75)
    # the docstring's worked example: a 460-step run (the default's 23 steps x 20 epochs)
    rates = {step: schedule.rate_at(step, 460) for step in range(1, 461)}
    steps = [s for s, r in rates.items() if r is not None]
    assert steps == [50, 100, 150, 200, 250, 300]  # frozen after 345
    assert rates[50] == pytest.approx(0.15 * (1 + math.cos(math.pi * 50 / 345)))
    assert all(rates[a] > rates[b] for a, b in zip(steps, steps[1:], strict=False))
    # the same schedule on CIFAR's 391 steps an epoch: the same rate at the same fraction
    assert schedule.rate_at(50 * 17, 460 * 17) == pytest.approx(rates[50])
    assert schedule.rewires(7820) == 117
    with pytest.raises(ValueError, match="prune_rate"):
        RewireSchedule(every=10, initial=1.5, until=0.5)


def test_regrowth_shares_account_for_layer_size():
    """Equal momentum per weight: a layer 9x larger gets 9x the regrowth, so a rewire does not
    drift toward equal weight counts (DNR's mean-momentum shares would give 0.5 / 0.5)."""
    masks = {"small": torch.ones(10, dtype=torch.bool), "large": torch.ones(90, dtype=torch.bool)}
    momenta = {"small": torch.full((10,), 0.2), "large": torch.full((90,), 0.2)}
    assert normalized_momentum(momenta, masks) == pytest.approx({"small": 0.5, "large": 0.5})
    assert regrowth_shares(momenta, masks) == pytest.approx({"small": 0.1, "large": 0.9})


def test_channel_cost_shares_price_a_unit_with_its_consumer_slices():
    """Two unit groups in a chain: a 3x3 conv on one input channel (a), a 3x3 conv on a (b),
    a 10-way linear on b. A unit of a costs its 9 weights plus 9 in each active unit of b,
    which the dense-row size (9 per unit of a) leaves out."""
    def count(masks):
        a, b = int(masks["a"].sum()), int(masks["b"].sum())
        return 9 * a + 9 * a * b + 10 * b

    masks = {"a": torch.tensor([True, True, False, False]),
             "b": torch.tensor([True, True, True, False])}
    rows = {"a": torch.full((4, 9), 0.1), "b": torch.full((4, 9 * 4), 0.1)}
    # equal momentum per weight: each group's share is what its active units cost
    cost_a, cost_b = 2 * (9 + 9 * 3), 3 * (9 * 2 + 10)
    assert channel_cost_shares(rows, masks, count) == pytest.approx(
        {"a": cost_a / (cost_a + cost_b), "b": cost_b / (cost_a + cost_b)})
    rows["a"] *= 3  # a's weights pushed 3x harder: its share grows by that factor
    shares = channel_cost_shares(rows, masks, count)
    assert shares["a"] == pytest.approx(3 * cost_a / (3 * cost_a + cost_b))


def test_nearly_dense_layer_with_high_momentum_is_not_pruned():
    weights = {"dense": torch.arange(1.0, 21.0), "sparse": torch.cat(
        [torch.arange(1.0, 11.0), torch.zeros(190)])}
    masks = {name: w != 0 for name, w in weights.items()}
    momenta = {"dense": torch.full((20,), 1.0), "sparse": torch.full((200,), 0.01)}
    rewired, _ = rewire_irregular(weights, momenta, masks, fraction=0.5)
    assert bool(rewired["dense"].all())  # Dettmers' rule: it would take them straight back
    assert int(rewired["sparse"].sum()) == 10


def test_redistribution_none_regrows_in_the_layer_that_pruned():
    weights, masks, momenta = two_layers()
    rewired, _ = rewire_irregular(weights, momenta, masks, 0.5, redistribution="none")
    assert int(rewired["a"].sum()) == 4 and int(rewired["b"].sum()) == 4


def test_erk_init_makes_small_layers_denser_at_the_exact_global_count():
    weights = {"conv1": torch.zeros(32, 1, 3, 3), "conv4": torch.zeros(256, 128, 3, 3),
               "fc": torch.zeros(10, 256)}
    shares = erk_shares(weights, 0.05)
    assert shares["conv1"] == 1.0  # capped: the ERK density would exceed 1
    assert shares["fc"] > 0.05 > shares["conv4"]
    masks = random_masks(weights, 0.05, torch.Generator().manual_seed(0), "erk")
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * total)
    assert bool(masks["conv1"].all())


def test_masked_weights_stay_zero_after_every_step_and_rewire_keeps_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    policy = IrregularDNR(model, 0.2, torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    count = sum(int(m.sum()) for m in policy.masks.values())
    params = dict(model.named_parameters())
    for _epoch in range(3):
        for _ in range(5):
            x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            policy.on_step_end(model)
            for name, mask in policy.masks.items():
                assert torch.count_nonzero(params[name][~mask]) == 0
                # gated weights still get gradients, hence momentum for regrowth
            assert any(params[n].grad[~m].abs().sum() > 0 for n, m in policy.masks.items())
        before = {n: m.clone() for n, m in policy.masks.items()}
        policy.rewire(model, optimizer, 0.3)
        assert sum(int(m.sum()) for m in policy.masks.values()) == count
        assert any(not torch.equal(before[n], policy.masks[n]) for n in before)
        for name, mask in policy.masks.items():
            assert torch.count_nonzero(params[name][~mask]) == 0


def test_apply_masks_zeroes_exactly():
    layer = nn.Linear(4, 2)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    apply_masks(layer, {"weight": mask})
    assert torch.count_nonzero(layer.weight[~mask]) == 0
    assert torch.count_nonzero(layer.weight[mask]) == 3


def test_start_density_closes_in_on_the_target_by_global_magnitude():
    """With start_density the masks begin dense and each rewire ends on the cubic schedule,
    the first cut taking the smallest weights across layers; the last rewire lands exactly on
    the target count, and masked weights stay zero throughout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    policy = IrregularDNR(model, 0.1, torch.Generator().manual_seed(1), start_density=1.0)
    assert policy.density() == 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = dict(model.named_parameters())
    total = sum(m.numel() for m in policy.masks.values())
    for progress in (0.25, 0.5, 1.0):
        x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        policy.on_step_end(model)
        if progress == 0.25:  # no regrowth (fraction ~0): exactly the largest |w| overall
            magnitudes = torch.cat([params[n].detach().abs().flatten() for n in policy.masks])
        policy.rewire(model, optimizer, 1e-9, progress)
        expected = 0.1 + 0.9 * (1 - progress) ** 3
        assert sum(int(m.sum()) for m in policy.masks.values()) == round(expected * total)
        if progress == 0.25:
            kept = torch.cat([policy.masks[n].flatten() for n in policy.masks])
            assert magnitudes[kept].min() >= magnitudes[~kept].max()
        for name, mask in policy.masks.items():
            assert torch.count_nonzero(params[name][~mask]) == 0
    assert policy.density() == pytest.approx(0.1, abs=1 / total)


def test_schedule_progress_reaches_one_at_the_last_rewire():
    schedule = RewireSchedule(every=50, initial=0.3, until=0.75)
    assert schedule.rewires(460) == 6
    assert schedule.progress(50, 460) == pytest.approx(1 / 6)
    assert schedule.progress(300, 460) == 1.0
