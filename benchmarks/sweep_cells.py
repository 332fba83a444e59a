"""How the torchvision sweep words a row's cells: read by benchmarks/torchvision_models.py
when it prints its table and by docs/generate.py when it renders results.md (torch-free)."""

from __future__ import annotations

import re


def trained_on(cell: dict) -> str:
    """What a row trained on: rows from before the short protocol trained one whole epoch."""
    return f"{cell['train_images']} images" if "train_images" in cell else "1 epoch"


# The known failures, said briefly: (pattern in the error, what the table says).
REASONS = (
    (r"cannot trace", "torch-pruning cannot trace it"),
    (r"still 1\b", "refused: no conv is a unit, the weights are in linear layers (irregular "
     "mode instead)"),
    (r"still ([0-9.]+)", "one channel per unit is density {}: grouped convs stay dense"),
    (r"not finite", "eval-mode logits overflow float32"),
    (r"differs from PyTorch by up to ([0-9.e+-]+) \(limit ([0-9.e+-]+)",
     "ONNX Runtime {} from PyTorch, limit {}"),
)


def reason(error: str) -> str:
    for pattern, text in REASONS:
        found = re.search(pattern, error)
        if found:
            return text.format(*found.groups())
    return error.split(":")[0]


def cell_text(row: dict, granularity: str) -> str:
    """passed (deployed params, dense convs) / failed at STAGE: the error's class / not run."""
    cell = row.get(granularity)
    if cell is None:
        return "not run"
    if not cell["passed"]:
        return f"failed at {cell['failed_at']}: {reason(cell['error'])}"
    dense = f", {cell['dense_convs']} convs dense" if cell.get("dense_convs") else ""
    if "density" in cell:  # the default density was out of reach: the retry's
        dense += f"; density {cell['density']:g}, 0.05 out of reach"
    return f"passed ({cell['params']['compression']:.1f}x{dense})"
