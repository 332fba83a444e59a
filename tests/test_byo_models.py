"""Bring your own model: torchvision:NAME and MODULE:FACTORY specs through compress and export,
channel mode on graphs whose couplings are not all one-to-one, and clean bad-spec errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from dnr_deploy.attacks.ensemble import EnsembleConfig
from dnr_deploy.cli import compress_main, export_main
from dnr_deploy.compress import trainer as trainer_module
from dnr_deploy.compress.checkpoint import load_checkpoint, read_run_json
from dnr_deploy.compress.trainer import compress
from dnr_deploy.compress.training import CompressConfig
from dnr_deploy.data import DataBundle
from dnr_deploy.export import ExportConfig, export_run, load_deployed_model, load_source
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.models import ModelSpecError, check_model_spec, create_model
from dnr_deploy.sparsity.groups import (
    ChannelCouplingWarning,
    ChannelLayout,
    dense_convs,
    find_channel_groups,
)
from dnr_deploy.sparsity.masks import prunable_weights
from dnr_deploy.sparsity.policy import ChannelBudgetError, ChannelDNR
from dnr_deploy.sparsity.surgery import shrink_model
from tests.helpers import assert_clean_failure, run_cli

TWO_BRANCH = "tests.byo_example:two_branch"
EXAMPLE = torch.zeros(1, 1, 8, 8)
# One short epoch on a slice of the digits: enough to exercise every stage, not to learn.
TINY = {"epochs": 1, "pgd_steps": 1, "batch_size": 32, "eval_samples": 32,
        "robust_eval_samples": 4}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def few_images(in_tmp, monkeypatch) -> Path:
    """compress trains on 96 digits and scores 48 test images (export still loads its own),
    with a token robustness ensemble: Square's 5,000 queries on an 11M-weight net dominate
    an otherwise 10 s run, and these tests are about the model, not the attacks."""
    real_robust = trainer_module.robust_evaluation
    quick = EnsembleConfig(apgd_steps=5, target_classes=1, square_queries=20)
    monkeypatch.setattr(trainer_module, "robust_evaluation",
                        lambda *args, **kwargs: real_robust(*args, **{**kwargs, "config": quick}))
    real = trainer_module.load_data

    def subset(name: str, data_dir: str | None = None) -> DataBundle:
        bundle = real(name, data_dir)
        return DataBundle(Subset(bundle.train, range(96)), Subset(bundle.test, range(48)),
                          bundle.spec)

    monkeypatch.setattr(trainer_module, "load_data", subset)
    return in_tmp


def compress_and_export(spec: str, granularity: str) -> tuple[Path, dict, dict]:
    """A tiny run of `spec`, exported; (run dir, run.json, manifest)."""
    out = f"{spec.replace(':', '-')}-{granularity}"
    run = compress(CompressConfig(model=spec, granularity=granularity, out=out, **TINY))
    result = export_run(ExportConfig(run_dir=str(run.dir), parity_samples=64, model=spec))
    return run.dir, read_run_json(run.dir), result.manifest


def check_export(run_dir: Path, run: dict, info: dict, spec: str) -> None:
    """The spec round-trips and the deployed model computes the masked training network."""
    assert run["model"]["name"] == info["model"]["name"] == spec
    parity = info["parity"]
    assert parity["onnx_vs_torch_max_abs"] <= 1e-4
    assert parity["argmax_agree"] == parity["n_images"] == 64
    x = torch.rand(8, 1, 8, 8)
    masked = onnx_io.torch_logits(load_source(run_dir, model_spec=spec).model, x)
    loaded = onnx_io.torch_logits(load_deployed_model(run_dir / "deploy", model=spec), x)
    np.testing.assert_allclose(loaded, masked, atol=1e-4, rtol=0)
    onnx = onnx_io.run_session(onnx_io.open_session(run_dir / "deploy" / "model.onnx"), x)
    np.testing.assert_allclose(onnx, masked, atol=1e-4, rtol=0)


def check_channel_run(run_dir: Path, run: dict, info: dict) -> None:
    """Convs left dense are dense in the checkpoint; export removed channels of the rest."""
    weights = load_checkpoint(run_dir)["model"]
    for conv in run["dense_convs"]:
        assert int(weights[f"{conv}.weight"].count_nonzero()) == weights[f"{conv}.weight"].numel()
    assert info["parity"]["shrunk_vs_masked_max_abs"] <= 1e-5
    assert info["macs"]["executed"] < info["macs"]["dense"]
    assert info["params"]["deployed"] < info["params"]["dense"]


@pytest.mark.parametrize("granularity", ["irregular", "channel"])
def test_own_module_with_two_added_branches(few_images, granularity):
    run_dir, run, info = compress_and_export(TWO_BRANCH, granularity)
    check_export(run_dir, run, info, TWO_BRANCH)
    if granularity == "channel":
        assert run["dense_convs"] == []  # the addition is one-to-one: every conv is prunable
        check_channel_run(run_dir, run, info)
    else:  # irregular masks reach every Conv2d and Linear of a model it has never seen
        model = create_model(TWO_BRANCH, 10, 1, [0.5], [0.25])
        assert set(run["layer_densities"]) == set(prunable_weights(model))
        assert run["density"]["achieved"] == pytest.approx(0.05, rel=0.01)


def test_own_module_with_a_concatenation_in_channel_mode(few_images):
    spec = "tests.byo_example:concatenated"
    run_dir, run, info = compress_and_export(spec, "channel")
    check_export(run_dir, run, info, spec)
    assert run["dense_convs"] == []  # both concatenated convs are units
    check_channel_run(run_dir, run, info)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["irregular", "channel"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_compress_and_export(few_images, name, granularity):
    spec = f"torchvision:{name}"
    run_dir, run, info = compress_and_export(spec, granularity)
    check_export(run_dir, run, info, spec)
    if granularity == "channel":
        check_channel_run(run_dir, run, info)
        assert run["dense_convs"] == []  # additions, and mobilenet_v2's depthwise convs


def test_the_two_branches_share_one_unit():
    model = create_model(TWO_BRANCH, 10, 1, [0.5], [0.25])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coupling to leave dense
        groups = find_channel_groups(model, EXAMPLE)
    convs = sorted(tuple(g.convs) for g in groups)
    assert convs == [("1.head.1",), ("1.wide.0", "1.narrow.0")] or \
        convs == [("1.head.1",), ("1.narrow.0", "1.wide.0")]


class Concat(nn.Module):
    """Two convs of different widths concatenated behind one batch norm (as in DenseNet), read
    by a conv that feeds a grouped conv: a and b are units, each a stretch of bn and mix; the
    grouped conv ties mix's channels in blocks, so mix and it stay dense."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.last = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))
        x = self.last(self.grouped(x))
        return self.fc(x.mean(dim=(2, 3)))


def switch_off_and_shrink(model: nn.Module, groups: list, masks: dict,
                          example: torch.Tensor = EXAMPLE) -> tuple:
    """Zero the off units' parameters as training's masks do, and the physically smaller net."""
    layout = ChannelLayout(model, groups)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in layout.param_masks(masks).items():
            params[name].mul_(mask)
    model.eval()
    return layout, shrink_model(model, groups, masks, example)[0]


def test_concatenated_convs_are_units_and_grouped_convs_stay_dense():
    model = Concat()
    with torch.no_grad():  # running statistics and shifts far from 0 and 1: nothing cancels
        model.bn.running_mean.uniform_(-1, 1), model.bn.bias.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    with pytest.warns(ChannelCouplingWarning, match="not one-to-one") as caught:
        groups = find_channel_groups(model, EXAMPLE)
    assert "groups=2" in str(caught[0].message)
    by_name = {g.name: g for g in groups}
    assert sorted(by_name) == ["a", "b", "last"]
    assert dense_convs(model, groups) == ["mix", "grouped"]
    assert (by_name["b"].norms, by_name["b"].consumers) == (["bn"], ["mix"])
    assert (by_name["a"].span("bn"), by_name["b"].span("mix")) == (slice(0, 4), slice(4, 10))
    masks = {"a": torch.tensor([True, False, True, False]),
             "b": torch.tensor([False, True, True, False, False, True]),
             "last": torch.tensor([True, True, False, True, True, True])}
    layout, shrunk = switch_off_and_shrink(model, groups, masks)
    assert (shrunk.bn.num_features, shrunk.mix.in_channels) == (5, 5)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in shrunk.parameters()) == layout.deployed_params(masks)
    assert layout.layer_densities(masks)["mix.weight"] == pytest.approx(5 / 10)


def test_a_density_the_dense_convs_forbid_is_one_clear_error():
    """RegNet's grouped convs stay dense; at 5% one channel per unit left its density at 17.5%,
    silently, and training on one-channel residual streams diverged. Now: a clear error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChannelCouplingWarning)
        with pytest.raises(ChannelBudgetError, match=r"cannot reach density 0\.05 .* still "
                           r"0\.388.* use --density 0\.49 or more"):
            ChannelDNR(Concat(), 0.05, torch.Generator().manual_seed(0), EXAMPLE)
        ChannelDNR(Concat(), 0.6, torch.Generator().manual_seed(0), EXAMPLE)  # reachable
        # nearly all of it in a layer channel mode cannot prune: no density to suggest
        mostly_linear = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 300))
        with pytest.raises(ChannelBudgetError, match=r"; use --granularity irregular$"):
            ChannelDNR(mostly_linear, 0.05, torch.Generator().manual_seed(0), EXAMPLE)


def test_densenet121_every_conv_is_a_unit_through_its_concatenations():
    """torchvision's DenseNet at CIFAR's size: every layer's conv is a stretch of the
    concatenations (and of the norms) behind it; masked equals shrunk, params counted exactly."""
    shape = (3, 32, 32)
    model = create_model("torchvision:densenet121", 10, 3, [0.5] * 3, [0.25] * 3,
                         input_shape=shape)
    example = torch.zeros(1, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelCouplingWarning)
        groups = find_channel_groups(model, example)
    assert dense_convs(model, groups) == []
    assert any(g.offsets for g in groups)
    generator = torch.Generator().manual_seed(0)
    masks = {g.name: torch.rand(g.size, generator=generator) < 0.6 for g in groups}
    for mask in masks.values():
        mask[0] = True
    with torch.no_grad():  # statistics far from 0 and 1: an ungated stretch would show
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1), norm.bias.uniform_(-1, 1)
    layout, shrunk = switch_off_and_shrink(model, groups, masks, example)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in shrunk.parameters()) == layout.deployed_params(masks)


def test_mobilenet_v2_depthwise_convs_join_their_producers_unit():
    """Unit c of an inverted residual: expand conv c, its norm, depthwise filter c, its norm;
    the projection reads it. Every conv is gated, none twice, and switching units off gives
    exactly what the physically smaller network computes."""
    model = create_model("torchvision:mobilenet_v2", 10, 1, [0.5], [0.25], input_shape=(1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelCouplingWarning)
        groups = find_channel_groups(model, EXAMPLE)
    assert dense_convs(model, groups) == []
    convs = [c for g in groups for c in g.convs]
    assert len(set(convs)) == len(convs)
    block = next(g for g in groups if g.name == "1.features.2.conv.0.0")
    assert block.convs == ["1.features.2.conv.0.0", "1.features.2.conv.1.0"]
    assert block.norms == ["1.features.2.conv.0.1", "1.features.2.conv.1.1"]
    assert block.consumers == ["1.features.2.conv.2"]
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in groups}  # half of every unit
    layout, shrunk = switch_off_and_shrink(model, groups, masks)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in shrunk.parameters()) == layout.deployed_params(masks)


def test_torchvision_stem_reads_the_dataset_channels():
    model = create_model("torchvision:resnet18", 10, 1, [0.5], [0.25], input_shape=(1, 8, 8))
    stem = model[1].conv1
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == \
        (1, 64, (7, 7), (2, 2))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_auxiliary_heads_are_built_without():
    """GoogLeNet returns auxiliary logits in training mode unless built without them."""
    model = create_model("torchvision:googlenet", 10, 3, [0.5] * 3, [0.25] * 3,
                         input_shape=(3, 32, 32))
    out = model.train()(torch.rand(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize(("spec", "expected"), [
    ("torchvision:no_such_net", "torchvision.models.list_models()"),
    ("torchvision:vgg11", "cannot run at this dataset's input size 1x8x8"),
    ("torchvision:squeezenet1_0", "the smallest it runs at is 32x32"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("tests.byo_example:missing", "has no attribute 'missing'"),
    ("tests.byo_example:not_a_module", "returned str, not an nn.Module"),
    ("tests.byo_example:", "torchvision:NAME or MODULE:FACTORY"),
    ("alexnet", "or torchvision:NAME, or MODULE:FACTORY"),
    ("tests.byo_example:auxiliary_head", "returns tuple in training mode"),
])
def test_bad_specs_are_one_line_exit_2_and_write_nothing(in_tmp, capsys, spec, expected):
    code = compress_main(["--model", spec, "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dnr-compress: error:"), err
    assert expected in lines[0]
    assert list(in_tmp.iterdir()) == []


def test_bad_spec_from_the_command_line(in_tmp):
    result = run_cli(["compress", "--model", "torchvision:no_such_net"], in_tmp)
    assert_clean_failure(result)
    assert "unknown torchvision model" in result.stderr


def test_check_model_spec_accepts_every_form():
    for spec in ("small", "torchvision:resnet18", TWO_BRANCH):
        check_model_spec(spec)
    with pytest.raises(ModelSpecError, match="unknown model"):
        check_model_spec("resnet50")


@pytest.mark.parametrize("granularity", ["irregular"])
def test_export_of_a_run_whose_module_is_gone_is_bad_input(few_images, capsys, granularity):
    run = compress(CompressConfig(model=TWO_BRANCH, granularity=granularity, out="run", **TINY))
    file = run.dir / "run.json"
    data = json.loads(file.read_text())
    data["model"]["name"] = "module_deleted_since:two_branch"
    file.write_text(json.dumps(data))
    capsys.readouterr()
    assert export_main([str(run.dir), "--trust-model-code"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot import module 'module_deleted_since'" in err
    assert not (run.dir / "deploy").exists()


def test_a_graph_torch_pruning_cannot_trace_has_no_channel_mode(in_tmp, capsys):
    """ShuffleNet's channel shuffle (a reshape) breaks torch-pruning's tracer: a clear exit 2
    that points to irregular mode, which needs no graph."""
    code = compress_main(["--model", "torchvision:shufflenet_v2_x0_5", "--granularity",
                          "channel", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot trace" in err and "use --granularity irregular" in err
    assert list(in_tmp.iterdir()) == []


@pytest.mark.slow
def test_mobilenet_v2_onnx_reimports_for_verify(tmp_path):
    """dnr-verify attacks the re-imported ONNX graph: MobileNet's ReLU6 exports as Clip."""
    from dnr_deploy.export.onnx import export_onnx
    from tests.test_runtime_onnx_torch import check_against_ort, input_gradient

    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v2", 10, 1, [0.5], [0.25]).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, EXAMPLE, path, 18)
    assert "Clip" in {node.op_type for node in onnx.load(str(path)).graph.node}
    graph = check_against_ort(path, (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    ours, theirs = input_gradient(graph, x), input_gradient(model, x)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * float(theirs.abs().max()), rtol=0)
