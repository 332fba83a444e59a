"""Figures of a run: its deployment sizes, and the plots written into the run dir."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dnr_deploy.compress.checkpoint import write_atomic  # noqa: E402
from dnr_deploy.sizes import size_figures  # noqa: E402
from dnr_deploy.sparsity.groups import dense_convs  # noqa: E402


def layer_labels(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Readable names for prunable weights: "1.3 Conv2d 64x32x3x3" instead of "1.3.weight"
    (Sequential models name their layers by index alone)."""
    modules = dict(model.named_modules())
    labels = {}
    for name in names:
        module = modules.get(name.removesuffix(".weight"))
        shape = "x".join(map(str, module.weight.shape)) if module is not None else ""
        kind = type(module).__name__ if module is not None else ""
        labels[name] = f"{name.removesuffix('.weight')} {kind} {shape}".strip()
    return labels


def plot_layer_densities(path: Path, densities: dict[str, float], target: float,
                         labels: dict[str, str], sizes: dict[str, int]) -> None:
    """Final per-layer density against the uniform start, and against the layer's size (the
    question rewiring answers: where did the budget go?)."""
    fig, (bar_ax, size_ax) = plt.subplots(1, 2, figsize=(max(9, 0.6 * len(densities) + 5), 3.8))
    names = list(densities)
    bar_ax.bar(range(len(names)), [densities[n] for n in names], color="tab:blue", label="final")
    bar_ax.axhline(target, color="tab:red", linestyle="--", label=f"target / uniform ({target:g})")
    bar_ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=35,
                      ha="right", fontsize=7)
    bar_ax.set_ylabel("density (fraction kept)")
    bar_ax.set_title("Per-layer density at the end", fontsize=9)
    bar_ax.legend(fontsize=7)
    size_ax.scatter([sizes[n] for n in names], [densities[n] for n in names], color="tab:blue")
    for name in names:
        size_ax.annotate(name.removesuffix(".weight"), (sizes[name], densities[name]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    size_ax.axhline(target, color="tab:red", linestyle="--")
    size_ax.set_xscale("log")
    size_ax.set_xlabel("layer size (weights)")
    size_ax.set_ylabel("final density")
    size_ax.set_title("Density against layer size", fontsize=9)
    _save(fig, path)


def plot_training(path: Path, history: list[dict], labels: dict[str, str]) -> None:
    """Training loss (clean and adversarial parts), clean and PGD test accuracy per epoch, and
    each layer's density at every rewire (the topology DNR found, and when it froze)."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax, dens_ax) = plt.subplots(1, 3, figsize=(13, 3.4))
    for key, label in (("loss", "hybrid"), ("loss_clean", "clean CE"),
                       ("loss_adv", "adversarial CE")):
        if all(key in row for row in history):
            loss_ax.plot(epochs, [row[key] for row in history], label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(fontsize=7)
    acc_ax.plot(epochs, [100 * row["clean_acc"] for row in history], label="clean")
    acc_ax.plot(epochs, [100 * row["pgd_acc"] for row in history], label="PGD (training attack)")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.legend(fontsize=7)
    rewires = [r for row in history for r in row.get("rewires", [])]
    if rewires:
        steps = [r["step"] for r in rewires]
        for name in rewires[0]["layer_densities"]:
            dens_ax.plot(steps, [r["layer_densities"][name] for r in rewires], marker=".",
                         label=labels.get(name, name))
        dens_ax.set_xlabel("optimizer step of the rewire")
        dens_ax.set_yscale("log")
        dens_ax.legend(fontsize=6)
    else:
        dens_ax.text(0.5, 0.5, "no rewiring in this run", ha="center", va="center")
    dens_ax.set_ylabel("layer density")
    dens_ax.set_title("Per-layer density over training", fontsize=9)
    _save(fig, path)


def plot_run(folder: Path, model: nn.Module, history: list[dict],
             layer_densities: dict[str, float], target: float) -> None:
    """A finished run's plots/: training curves, and per-layer densities of a pruned run."""
    labels = layer_labels(model, list(layer_densities))
    plot_training(folder / "training.png", history, labels)
    if layer_densities:
        params = dict(model.named_parameters())
        sizes = {n: params[n].numel() if n in params else 0 for n in layer_densities}
        plot_layer_densities(folder / "layer_densities.png", layer_densities, target, labels,
                             sizes)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def deployment_figures(model: nn.Module, policy, example_input: torch.Tensor) -> dict:
    """Parameters and MACs of the dense network and of what export will deploy
    (`sizes.size_figures`, the counter the manifest uses too; the policy says what is
    deployed: the shrunk network of a channel run, the masked one of an irregular run)."""
    deployed, masks = policy.deployed(model, example_input)
    figures = size_figures(model, deployed, example_input, masks)
    layout = getattr(policy, "layout", None)
    if layout is not None:  # channel runs: convs whose coupling no unit can gate stay dense
        figures["dense_convs"] = dense_convs(model, list(layout.groups.values()))
    return figures
