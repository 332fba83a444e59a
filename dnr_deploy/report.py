"""Figures of a run: MAC counts, and the plots written into the run dir."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dnr_deploy.checkpoint import write_atomic  # noqa: E402


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor, nonzero_only: bool = False) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one input.

    With `nonzero_only`, a zero weight costs nothing: the MACs a sparse kernel would do. Written
    with hooks instead of torch-pruning's counter because that counter cannot see zeros.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        weights = int(module.weight.count_nonzero()) if nonzero_only else module.weight.numel()
        positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total += weights * positions // (module.groups if isinstance(module, nn.Conv2d) else 1)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def plot_layer_densities(path: Path, densities: dict[str, float], target: float) -> None:
    """Bar chart of the final per-layer densities against the uniform start."""
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(densities)), 3.5))
    names = [n.removesuffix(".weight") for n in densities]
    ax.bar(range(len(densities)), list(densities.values()), color="tab:blue", label="final")
    ax.axhline(target, color="tab:red", linestyle="--", label=f"target / uniform ({target:g})")
    ax.set_xticks(range(len(densities)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("density (fraction kept)")
    ax.set_title("Per-layer density after DNR")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_training(path: Path, history: list[dict]) -> None:
    """Clean and PGD test accuracy and density per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (acc_ax, dens_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    acc_ax.plot(epochs, [row["clean_acc"] for row in history], label="clean")
    acc_ax.plot(epochs, [row["pgd_acc"] for row in history], label="PGD")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy")
    acc_ax.legend()
    dens_ax.plot(epochs, [row["density"] for row in history])
    dens_ax.set_xlabel("epoch")
    dens_ax.set_ylabel("global density")
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def deployment_figures(model: nn.Module, policy, example_input: torch.Tensor) -> dict:
    """Parameters and conv/linear MACs of the dense network and of what export will deploy.

    Channel runs: the network with off units physically removed (built here with
    torch-pruning, exactly as export does). Irregular runs: the nonzero weights; ONNX Runtime
    still runs dense kernels, so those MACs are what a sparse kernel would need.
    """
    from dnr_deploy.export.channel import shrink_model
    from dnr_deploy.sparsity.policy import ChannelDNR

    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = count_macs(model, example_input)
    if isinstance(policy, ChannelDNR):
        groups = list(policy.layout.groups.values())
        shrunk, _ = shrink_model(model, groups, policy.channel_masks, example_input)
        deployed_params = policy.layout.deployed_params(policy.channel_masks)
        deployed_macs = count_macs(shrunk, example_input)
    else:
        masks = getattr(policy, "masks", {})
        zeros = sum(int((~m).sum()) for m in masks.values())
        deployed_params = dense_params - zeros
        deployed_macs = count_macs(model, example_input, nonzero_only=bool(masks))
    return {
        "params": {"dense": dense_params, "deployed": deployed_params,
                   "compression": dense_params / deployed_params},
        "macs": {"dense": dense_macs, "deployed": deployed_macs,
                 "reduction": dense_macs / max(deployed_macs, 1)},
    }
