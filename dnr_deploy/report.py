"""Figures of a run: its deployment sizes, and the plots written into the run dir."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dnr_deploy.checkpoint import write_atomic  # noqa: E402
from dnr_deploy.sizes import size_figures  # noqa: E402


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
    """Parameters and MACs of the dense network and of what export will deploy
    (`sizes.size_figures`, the counter the manifest uses too). Channel runs: the network with
    off units physically removed, built here with torch-pruning exactly as export does."""
    from dnr_deploy.sparsity.policy import ChannelDNR
    from dnr_deploy.sparsity.surgery import shrink_model

    if isinstance(policy, ChannelDNR):
        groups = list(policy.layout.groups.values())
        deployed, _ = shrink_model(model, groups, policy.channel_masks, example_input)
        return size_figures(model, deployed, example_input)
    return size_figures(model, model, example_input, getattr(policy, "masks", None))
