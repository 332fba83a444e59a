"""The pictures bench and verify leave beside their JSON: a latency plot and example images.

Figures are built on matplotlib's object API (no pyplot, so no global backend state) and
written atomically like every other file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dnr_deploy.compress.checkpoint import write_atomic


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _as_image(chw: np.ndarray) -> tuple[np.ndarray, str | None]:
    """CHW in [0, 1] -> what imshow takes, and the colour map for one channel."""
    if chw.shape[0] == 1:
        return chw[0], "gray"
    return np.transpose(chw, (1, 2, 0)), None


def save_examples(
    path: Path, x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, pred_clean: np.ndarray,
    pred_adv: np.ndarray, eps: float, class_names: list[str] | None = None,
) -> None:
    """A grid: clean images (row 1), adversarial ones (row 2), the perturbation scaled from
    [-eps, eps] to [0, 1] (row 3), with labels and the deployed model's predictions (by
    name when `class_names` has one for every class)."""
    from matplotlib.figure import Figure

    count = len(x)
    name = lambda k: str(class_names[int(k)]) if class_names and 0 <= int(k) < len(  # noqa: E731
        class_names) else str(k)
    fig = Figure(figsize=(1.6 * max(count, 1), 5.2))
    axes = fig.subplots(3, max(count, 1), squeeze=False)
    for col in range(count):
        delta = (x_adv[col] - x[col]) / (2 * eps) + 0.5
        outcome, colour = _outcome(y[col], pred_clean[col], pred_adv[col])
        rows = ((x[col], f"y={name(y[col])} pred={name(pred_clean[col])}\n{outcome}"),
                (x_adv[col], f"adv pred={name(pred_adv[col])}"),
                (np.clip(delta, 0.0, 1.0), f"|d|max={np.abs(x_adv[col] - x[col]).max():.3f}"))
        for row, (image, title) in enumerate(rows):
            picture, cmap = _as_image(image)
            axes[row][col].imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0,
                                  interpolation="nearest")
            axes[row][col].set_title(title, fontsize=7, color=colour if row == 0 else "black")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, name in enumerate(("clean", "adversarial", "perturbation")):
        axes[row][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"deployed model under attack (Linf eps {eps:.4g})\nred: the attack "
                 "succeeded; green: the model held; perturbation: grey = 0", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _outcome(label: int, pred_clean: int, pred_adv: int) -> tuple[str, str]:
    """What happened to one image, and its title colour: red where the attack won."""
    if pred_clean != label:
        return "wrong when clean", "grey"
    if pred_adv != label:
        return "ATTACK SUCCEEDED", "red"
    return "model held", "green"


def save_latency_plot(path: Path, models: dict[str, dict]) -> None:
    """p50 latency per batch size for each model, whiskers from p50 to p99 (log scale).

    Args:
        models: {label: {"latency": {batch: {"p50_ms", "p90_ms", "p99_ms", ...}}}}.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    labels = list(models)
    batches = sorted({int(b) for m in models.values() for b in m["latency"]})
    width = 0.8 / max(len(labels), 1)
    for index, label in enumerate(labels):
        stats = models[label]["latency"]
        p50 = np.array([stats[str(b)]["p50_ms"] for b in batches])
        p99 = np.array([stats[str(b)]["p99_ms"] for b in batches])
        positions = np.arange(len(batches)) + (index - (len(labels) - 1) / 2) * width
        ax.bar(positions, p50, width, label=label)
        ax.errorbar(positions, p50, yerr=[np.zeros_like(p50), p99 - p50], fmt="none",
                    ecolor="black", capsize=3, linewidth=1)
    ax.set_xticks(np.arange(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch, ms (bar p50, whisker p99)")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
