"""Rewiring mechanics on small hand-built layers."""

import pytest
import torch
from torch import nn

from dnr_deploy.sparsity.masks import apply_masks, random_masks, split_budget
from dnr_deploy.sparsity.policy import IrregularDNR
from dnr_deploy.sparsity.rewire import (
    RewireSchedule,
    Redistribution,
    normalized_momentum,
    prune_rate,
    prune_smallest,
    regrow_largest,
    rewire_irregular,
)


def test_normalized_momentum_sums_to_one_and_ignores_inactive():
    masks = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, False])}
    momenta = {"a": torch.tensor([0.2, -0.4, 100.0]), "b": torch.tensor([-0.1, 50.0, 50.0])}
    shares = normalized_momentum(momenta, masks, Redistribution.MEAN)
    assert sum(shares.values()) == pytest.approx(1.0)
    # a: mean(|0.2|, |-0.4|) = 0.3; b: 0.1 -> 0.75, 0.25 (inactive entries ignored)
    assert shares["a"] == pytest.approx(0.75)
    assert shares["b"] == pytest.approx(0.25)
    # by total: a 0.6, b 0.1 -> 6/7, 1/7 (a has twice the active weights)
    shares = normalized_momentum(momenta, masks, Redistribution.MOMENTUM)
    assert shares["a"] == pytest.approx(6 / 7)


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


def test_rewire_moves_budget_by_momentum_and_keeps_global_count():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0]),
               "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0])}
    masks = {name: w != 0 for name, w in weights.items()}
    momenta = {"a": torch.tensor([0.3, 0.3, 0.3, 0.3, 0.5, 0.4, 0.1, 0.2]),
               "b": torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.7, 0.0])}
    rewired, shares = rewire_irregular(weights, momenta, masks, 0.5, Redistribution.MEAN)
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


def test_prune_rate_decays_by_cosine_to_zero_at_the_freeze_point():
    rates = [prune_rate(s, 400, initial=0.3, until=0.75) for s in range(0, 301, 50)]
    assert rates[0] == pytest.approx(0.3)
    assert rates[3] == pytest.approx(0.15)  # half way to step 300
    assert rates[6] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_masked_weights_stay_zero_after_every_step_and_rewire_keeps_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    policy = IrregularDNR(model, 0.2, torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    count = sum(int(m.sum()) for m in policy.masks.values())
    params = dict(model.named_parameters())
    schedule = RewireSchedule(every=5, initial=0.5, until=1.0)
    policy.schedule = schedule
    step = 0
    for _epoch in range(3):
        for _ in range(4):
            x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            assert policy.on_step_end(model, optimizer, step, 20) == {}  # not due: no rewire
            for name, mask in policy.masks.items():
                assert torch.count_nonzero(params[name][~mask]) == 0
                # gated weights still get gradients, hence momentum for regrowth
            assert any(params[n].grad[~m].abs().sum() > 0 for n, m in policy.masks.items())
        before = {n: m.clone() for n, m in policy.masks.items()}
        step += 1
        figures = policy.on_step_end(model, optimizer, step, 20)
        assert figures["prune_fraction"] == schedule.fraction(step, 20)
        assert set(figures["layer_densities"]) == set(figures["momentum_shares"]) == set(before)
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
