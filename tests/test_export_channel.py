"""Channel export: off units removed (residual ties too), ONNX equal to the masked network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dnr_deploy.deploydir import names
from dnr_deploy.export import channel
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.models import create_model
from dnr_deploy.sparsity import surgery
from dnr_deploy.sparsity.groups import ChannelLayout, find_channel_groups
from dnr_deploy.sparsity.masks import apply_masks
from tests.factories import randomize_norms


def random_channel_masks(groups, generator: torch.Generator, keep: float = 0.5) -> dict:
    """About `keep` of every unit's channels on, at least one, at least one off."""
    masks = {}
    for group in groups:
        order = torch.randperm(group.size, generator=generator)
        on = max(1, min(group.size - 1, round(keep * group.size)))
        mask = torch.zeros(group.size, dtype=torch.bool)
        mask[order[:on]] = True
        masks[group.name] = mask
    return masks


def masked_net(name: str, seed: int = 0):
    """A CIFAR-shaped model with random channel masks applied, as a channel run leaves it."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = create_model(name, 10, 3, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
    randomize_norms(model, generator)
    example = torch.zeros(1, 3, 32, 32)
    groups = find_channel_groups(model, example)
    masks = random_channel_masks(groups, generator)
    layout = ChannelLayout(model, groups)
    apply_masks(model, layout.param_masks(masks))
    return model, groups, masks, layout, example


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_shrunk_network_exports_to_onnx_equal_to_masked(name, tmp_path):
    model, groups, masks, layout, example = masked_net(name)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = onnx_io.torch_logits(model, x)

    shrunk, history = surgery.shrink_model(model, groups, masks, example)

    # What a channel run reports as its deployed size is what export delivers.
    assert sum(p.numel() for p in shrunk.parameters()) == layout.deployed_params(masks)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    shrink = onnx_io.compare_logits(reference, onnx_io.torch_logits(shrunk, x))
    assert shrink.passes(1e-5), shrink

    path = tmp_path / "model.onnx"
    onnx_io.export_onnx(shrunk, example, path, opset=18)
    onnx_io.check_onnx(path)
    session = onnx_io.open_session(path)
    parity = onnx_io.compare_logits(reference, onnx_io.run_session(session, x))
    assert parity.passes(1e-4), parity
    # Dynamic batch: one image and a batch of six run through the same file.
    single = onnx_io.run_session(session, x[:1])
    np.testing.assert_allclose(single, reference[:1], atol=1e-4)
    assert history, "off channels were requested, so the history cannot be empty"


def test_residual_tied_channels_are_removed_together():
    model, groups, masks, _, example = masked_net("resnet18", seed=3)
    stem = next(g for g in groups if g.name == "1.stem.0")
    assert len(stem.convs) == 3  # stem + both stage-1 conv2s share one residual sum
    assert not masks[stem.name].all()

    shrunk, _ = surgery.shrink_model(model, groups, masks, example)
    modules = dict(shrunk.named_modules())
    kept = int(masks[stem.name].sum())
    for conv in stem.convs:
        assert modules[conv].out_channels == kept, conv
    for consumer in ("1.layers.0.conv1", "1.layers.1.conv1", "1.layers.2.conv1",
                     "1.layers.2.shortcut.0"):
        assert modules[consumer].in_channels == kept, consumer
    assert modules["1.stem.1"].num_features == kept


def test_history_and_state_rebuild_the_shrunk_model(tmp_path):
    model, groups, masks, _, example = masked_net("resnet18", seed=5)
    shrunk, history = surgery.shrink_model(model, groups, masks, example)

    channel.save_state(tmp_path, shrunk, history)
    stored = json.loads((tmp_path / names.HISTORY_FILE).read_text())
    assert stored == surgery.history_to_json(history)
    with np.load(tmp_path / names.WEIGHTS_FILE, allow_pickle=False) as npz:
        assert set(npz.files) == set(shrunk.state_dict())

    state, loaded_history = channel.load_state(tmp_path)
    fresh = create_model("resnet18", 10, 3, (0.0,) * 3, (1.0,) * 3)
    surgery.replay_pruning(fresh, loaded_history, example)
    fresh.load_state_dict(state)
    x = torch.rand(3, 3, 32, 32)
    np.testing.assert_array_equal(onnx_io.torch_logits(fresh, x), onnx_io.torch_logits(shrunk, x))


def test_masks_that_cannot_be_removed_are_rejected():
    model, groups, masks, _, _ = masked_net("vgg16")
    all_off = {**masks, groups[2].name: torch.zeros(groups[2].size, dtype=torch.bool)}
    with pytest.raises(surgery.ShrinkError, match="every channel off"):
        surgery.check_channel_masks(groups, all_off)
    with pytest.raises(surgery.ShrinkError, match="unknown"):
        surgery.check_channel_masks(groups, {**masks, "1.99": masks[groups[0].name]})
    wrong_size = {**masks, groups[0].name: torch.ones(3, dtype=torch.bool)}
    with pytest.raises(surgery.ShrinkError, match="bool vector"):
        surgery.check_channel_masks(groups, wrong_size)
    surgery.check_channel_masks(groups, masks)  # the valid masks pass


@pytest.mark.parametrize("data", [{"a": 1}, [["1.0", "yes", [1]]], [["1.0", True, [-1]]],
                                  [["1.0", True]]])
def test_malformed_history_is_rejected(data):
    with pytest.raises(surgery.ShrinkError, match="not a pruning history"):
        surgery.parse_history(data, "pruning_history.json")
