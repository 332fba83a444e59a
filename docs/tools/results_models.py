"""The results pages' sections on the sparse runtime and torchvision's classifiers."""

from __future__ import annotations

from results_page import command_of, load, table
from sweep_cells import cell_text, trained_on


def sparse_runtime_section() -> str:
    data, small = load("sparse_runtime"), load("sparse_runtime_small_net")
    threshold, winograd = load("sparse_threshold"), load("winograd_threshold")
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
        _ratio_table(threshold["layers"]), "",
        "Where Winograd F(4x4, 3x3) pays (sparse time / Winograd time for one 3x3 stride-1 "
        f"layer, a chunk of {winograd['args']['batch']} images, 1 thread; above 1 Winograd is "
        "faster; `winograd.pays` is read off it): " + command_of(winograd, "winograd_threshold"),
        "", _ratio_table(winograd["layers"])]) + "\n"


def _ratio_table(layers: dict) -> str:
    densities = list(next(iter(layers.values())))
    return table(["layer", *densities],
                 [[layer, *(f"{values[d]:.2f}" for d in densities)]
                  for layer, values in layers.items()])


def torchvision_section() -> str:
    data = load("torchvision_sweep")
    rows = []
    for model, row in sorted(data["models"].items(), key=lambda item: item[1]["dense_params"]):
        cells = [cell_text(row, g) for g in ("irregular", "channel")] if row["builds"] else \
            ["does not build at 1x8x8", ""]
        trained = " / ".join(dict.fromkeys(trained_on(row[g]) for g in ("irregular", "channel")
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
