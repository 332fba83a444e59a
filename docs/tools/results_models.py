"""The results pages' sections on the sparse runtime and torchvision's classifiers."""

from __future__ import annotations

import re

from results_page import command_of, load, table


def sparse_runtime_section() -> str:
    data, small = load("sparse_runtime"), load("sparse_runtime_small_net")
    threshold = load("sparse_threshold")
    rows = []
    for source in (data, small):
        batches = source["args"]["batches"]
        for threads in source["args"]["threads"]:
            for model, cells in source["models"].items():
                for density in source["args"]["densities"]:
                    figures = [cells.get(f"d{density:g}-t{threads}-b{batch}")
                               for batch in batches]
                    rows.append([model, density, threads, *(
                        f"{cell['speedup']:.2f}x ({cell['efficiency']:.2f})" if cell else "-"
                        for cell in figures)])
    layers = threshold["layers"]
    densities = list(next(iter(layers.values())))
    return "\n".join([
        "### Sparse runtime against ONNX Runtime dense", "",
        command_of(data, "sparse_runtime") + " and " + command_of(small,
                                                                  "sparse_runtime_small_net"),
        "", "Random irregular masks; VGG16 and ResNet-18 at 32x32, the default small net at "
        "1x8x8. Speedup of the sparse runtime over ONNX Runtime dense (in brackets: efficiency "
        "against the nonzero-MAC bound). See [sparse-runtime.md](sparse-runtime.md).", "",
        table(["model", "density", "threads", *(f"batch {b}" for b in data["args"]["batches"])],
              rows), "",
        "Where the dense fallback pays (sparse time / im2col + BLAS time for one 3x3 layer, "
        "batch 4, 1 thread; below 1 the sparse kernel is faster): "
        + command_of(threshold, "sparse_threshold"), "",
        table(["layer", *densities],
              [[layer, *(f"{values[d]:.2f}" for d in densities)]
               for layer, values in layers.items()])]) + "\n"


# The known failures, said briefly, as benchmarks/torchvision_models.py words them.
REASONS = (
    (r"cannot trace", "torch-pruning cannot trace it"),
    (r"still 1\b", "refused: no conv is a unit, the weights are in linear layers (irregular "
     "mode instead)"),
    (r"still ([0-9.]+)", "one channel per unit is density {}: grouped convs stay dense"),
    (r"not finite", "eval-mode logits overflow float32"),
    (r"differs from PyTorch by up to ([0-9.e+-]+) \(limit ([0-9.e+-]+)",
     "ONNX Runtime {} from PyTorch, limit {}"),
)


def _reason(error: str) -> str:
    for pattern, text in REASONS:
        found = re.search(pattern, error)
        if found:
            return text.format(*found.groups())
    return error.split(":")[0]


def _cell(row: dict, granularity: str) -> str:
    cell = row.get(granularity)
    if cell is None:
        return "not run"
    if not cell["passed"]:
        return f"failed at {cell['failed_at']}: {_reason(cell['error'])}"
    dense = f", {cell['dense_convs']} convs dense" if cell.get("dense_convs") else ""
    if "density" in cell:  # the default density was out of reach: the retry's
        dense += f"; density {cell['density']:g}, 0.05 out of reach"
    return f"passed ({cell['params']['compression']:.1f}x{dense})"


def _trained_on(cell: dict) -> str:
    return f"{cell['train_images']} images" if "train_images" in cell else "1 epoch"


def torchvision_section() -> str:
    data = load("torchvision_sweep")
    rows = []
    for model, row in sorted(data["models"].items(), key=lambda item: item[1]["dense_params"]):
        cells = [_cell(row, g) for g in ("irregular", "channel")] if row["builds"] else \
            ["does not build at 1x8x8", ""]
        trained = " / ".join(dict.fromkeys(_trained_on(row[g]) for g in ("irregular", "channel")
                                           if g in row))
        rows.append([model, f"{row['dense_params'] / 1e6:.1f}M", trained, *cells])
    built = [row for row in data["models"].values() if row["builds"]]
    passed = {g: sum(bool(row.get(g, {}).get("passed")) for row in built)
              for g in ("irregular", "channel")}
    return "\n".join([
        "### Every torchvision classifier through the pipeline", "",
        command_of(data, "torchvision_sweep") + " The shards it merges were written by "
        "`python torchvision_models.py --shard K/N --name tv_K --resume` (one file each in "
        "`benchmarks/results/tv_*.json`). On the embedded digits (8x8, one channel): "
        "`--epochs 1 --pgd-steps 1 --batch-size 128 --lr 0.01`, then dnr-export with its "
        "parity gates and `dnr-verify --attack pgd --steps 2 --n 32`; rows marked "
        "\"256 images\" trained two steps on the first 256 training images. They show that the "
        "pipeline runs, not what a network learns in a few steps.", "",
        f"{len(data['models'])} classifiers tried; {len(built)} build at 8x8; "
        f"{passed['irregular']} pass end to end in irregular mode and {passed['channel']} in "
        "channel mode.", "",
        table(["model", "params", "trained on", "irregular", "channel"], rows)]) + "\n"
