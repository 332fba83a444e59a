"""Builders the tests share (instead of importing each other's helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dnr_deploy import data
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress.checkpoint import write_json
from dnr_deploy.compress.plots import deployment_figures
from dnr_deploy.deploydir.manifest import MANIFEST_FORMAT, write_manifest
from dnr_deploy.models import create_model
from dnr_deploy.sparsity.policy import ChannelDNR, DensePolicy, IrregularDNR


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics, so the exporter's BN folding is really exercised."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))


def masked_paper_model(name: str, density: float) -> nn.Module:
    """A seeded registry network (vgg16, resnet18) for 3x32x32 inputs in eval mode, with
    non-trivial batch norms and random irregular masks at `density` applied."""
    from dnr_deploy.models import create_model
    from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks

    torch.manual_seed(0)
    model = create_model(name, 10, 3, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]).eval()
    randomize_norms(model, torch.Generator().manual_seed(0))
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    apply_masks(model, random_masks(weights, density, torch.Generator().manual_seed(0)))
    return model


def int8_irregular_deploy_dir(run_dir: Path, *extra: str, density: float = 0.05,
                              model_name: str = "small") -> Path:
    """`write_fake_run` then `dnr-export --quantize int8` (no clean-accuracy gate: the weights
    are random): an irregular int8 deploy dir with weights.int8.npz. `extra`: more export
    flags."""
    from dnr_deploy.cli import export_main
    from dnr_deploy.deploydir import names

    write_fake_run(run_dir, "irregular", density=density, model_name=model_name)
    assert export_main([str(run_dir), "--quantize", "int8", "--int8-max-drop", "100",
                        *extra]) == 0
    return run_dir / names.DEFAULT_OUT


def write_fake_run(run_dir: Path, granularity: str = "irregular", density: float = 0.05,
                   model_name: str = "small") -> dict:
    """A finished run dir as dnr-compress writes it (digits, the `small` net unless
    `model_name` names another registry net), without training: random weights and masks, but
    the same checkpoint and run.json contract. Returns run.json."""
    spec = data.SPECS[data.DatasetName.DIGITS]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = create_model(model_name, spec.num_classes, spec.input_shape[0], spec.mean, spec.std)
    randomize_norms(model, generator)
    example = torch.zeros(1, *spec.input_shape)
    policy = {"irregular": lambda: IrregularDNR(model, density, generator),
              "channel": lambda: ChannelDNR(model, density, generator, example),
              "dense": DensePolicy}[granularity]()
    model.eval()
    config = {"model": model_name, "dataset": "digits", "data_dir": None,
              "granularity": granularity, "density": density, "epochs": 1}
    ckpt.save_checkpoint(run_dir, {
        "epoch": 1, "config": config, "model": model.state_dict(), "optimizer": {},
        "policy": policy.state_dict(), "rng": {}, "history": [],
    })
    run = {
        "format": "dnr-deploy/run/1", "config": config,
        "model": {"name": model_name, "num_classes": spec.num_classes,
                  "in_chans": spec.input_shape[0]},
        "input_shape": list(spec.input_shape), "input_range": [0.0, 1.0],
        "num_classes": spec.num_classes, "mean": list(spec.mean), "std": list(spec.std),
        "granularity": policy.granularity,
        "density": {"target": density, "achieved": policy.density()},
        "layer_densities": policy.layer_densities(),
        **deployment_figures(model, policy, example),
        "threat_model": {"norm": "Linf", "eps": spec.eps},
        "accuracy": {"clean": 0.1, "fgsm": 0.1, "pgd7": 0.1, "pgd20": 0.1},
        "checkpoint_sha256": ckpt.sha256_of(run_dir / ckpt.CHECKPOINT_NAME),
    }
    ckpt.write_json(run_dir / ckpt.RUN_JSON, run)
    return run


def tiny_graph(seed: int, softmax: bool = False, zero: bool = False,
               channels: int = 16) -> onnx.ModelProto:
    """A digits-shaped net written directly as ONNX (the export contract's names and dynamic
    batch): Sub/Div normalization, Conv, Relu, MaxPool, ReduceMean, Reshape, Gemm."""
    rng = np.random.default_rng(seed)
    scale = 0.0 if zero else 1.0
    inits = {
        "mean": np.full((1, 1, 1, 1), 0.3, np.float32), "std": np.full((1, 1, 1, 1), 0.38,
                                                                       np.float32),
        "w": (scale * rng.standard_normal((channels, 1, 3, 3))).astype(np.float32),
        "b": (0.1 * rng.standard_normal(channels)).astype(np.float32),
        "axes": np.array([-1, -2], np.int64), "shape": np.array([-1, channels], np.int64),
        "fc": (scale * rng.standard_normal((10, channels))).astype(np.float32),
        "fc_b": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    last = "probs" if softmax else "logits"
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["d"]),
        helper.make_node("Conv", ["d", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], [last], transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["probs"], ["logits"], axis=-1))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def onnx_sizes(folder: Path) -> dict:
    """The manifest's "onnx_sizes" of the ONNX files in `folder`, as dnr-export records it."""
    from dnr_deploy.deploydir.cross_check import measure_onnx_files

    names = sorted(file.name for file in folder.iterdir())
    return {name: sizes.record() for name, sizes in measure_onnx_files(folder, names).items()}


def make_deploy_dir(folder: Path, robust: float | None = 0.0, eps: float = 0.2,
                    **graph) -> Path:
    """A deploy dir as dnr-export writes it (model.onnx, baseline.onnx, manifest.json with the
    sha256 of each), whose source run's run.json names the digits dataset. `robust`: the
    training side's AutoAttack-grade figure (None: a manifest from before it existed)."""
    # random weights: the training side claims no clean accuracy the graph could fall short of
    accuracy = {"clean": 0.0, "fgsm": 0.0, "pgd7": 0.0, "pgd20": 0.0}
    if robust is not None:
        accuracy["autoattack"] = robust
    run_dir = folder.parent / f"{folder.name}_run"
    write_json(run_dir / "run.json", {"config": {"dataset": "digits", "data_dir": None}})
    folder.mkdir(parents=True)
    onnx.save(tiny_graph(0, **graph), str(folder / "model.onnx"))
    onnx.save(tiny_graph(1, channels=32), str(folder / "baseline.onnx"))  # twice the MACs
    write_manifest(folder, {
        "format": MANIFEST_FORMAT, "source_run": {"dir": str(run_dir)},
        "model": {"name": "tiny", "num_classes": 10, "in_chans": 1}, "input_shape": [1, 8, 8],
        "input_range": [0.0, 1.0], "num_classes": 10, "granularity": "channel",
        "threat_model": {"norm": "Linf", "eps": eps},
        "accuracy": accuracy,
        "robustness": {"images": 360, "protocol": {"attack": "autoattack", "apgd_steps": 100}},
        "params": {"dense": 660, "deployed": 330},
        "macs": {"dense": 18752, "executed": 9376, "nonzero": 9376},
        "onnx_sizes": onnx_sizes(folder),
    })
    return folder
