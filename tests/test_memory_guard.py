"""The memory budget that turns torch-pruning's runaway index propagation into a dense group."""

import signal
import time
import warnings

import pytest
import torch
import torch_pruning as tp

from dnr_deploy.models import create_model
from dnr_deploy.sparsity import groups as groups_module
from dnr_deploy.sparsity.groups import ChannelCouplingWarning, find_channel_groups
from dnr_deploy.sparsity.memory_guard import MemoryBudgetExceeded, memory_budget, resident_bytes

pytestmark = pytest.mark.skipif(resident_bytes() is None, reason="needs /proc/self/statm")


def grow(limit_seconds: float = 10.0) -> list[bytearray]:
    """Allocate and touch 8 MB blocks until interrupted (or the time is up)."""
    blocks, deadline = [], time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        blocks.append(bytearray(b"x" * (8 << 20)))
    return blocks


def test_a_block_past_its_budget_is_interrupted_and_the_handler_restored():
    before = signal.getsignal(signal.SIGUSR1)
    started = time.monotonic()
    with pytest.raises(MemoryBudgetExceeded, match="grew past"), memory_budget(64 << 20):
        grow()
    assert time.monotonic() - started < 5  # interrupted, not run out its 10 s
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_block_within_its_budget_runs_to_the_end():
    with memory_budget(1 << 30):
        result = sum(range(10**5))
    assert result == sum(range(10**5))


def test_runaway_propagation_leaves_the_group_dense_instead_of_killing_the_process(
        monkeypatch):
    model = create_model("small", 10, 1, [0.5], [0.25])
    real = tp.DependencyGraph.get_pruning_group

    def runaway_for_conv2(self, module, handler, idxs):
        if module is model[1][3]:  # the second conv: its propagation never ends
            grow()
        return real(self, module, handler, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", runaway_for_conv2)
    monkeypatch.setattr(groups_module, "PROPAGATION_BUDGET_BYTES", 64 << 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_channel_groups(model, torch.zeros(1, 1, 8, 8))
    names = [g.name for g in found]
    assert "1.3" not in names and {"1.0", "1.7", "1.10"} <= set(names)
    message = " ".join(str(w.message) for w in caught if w.category is ChannelCouplingWarning)
    assert "1.3 (torch-pruning's index propagation grew past" in message
