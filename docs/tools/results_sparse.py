"""The results page's sections on the sparse engine loading model.onnx and the int8 sparse
kernels, so that docs/sparse-runtime.md and docs/int8.md only link here (issue 30: no
results figure is typed by hand)."""

from __future__ import annotations

import statistics

from results_page import command_of, load, pct, table

TITLES = {"small": "small (default net)", "vgg16": "VGG16", "resnet18": "ResNet-18"}


def _speedup_cell(cell: dict | None) -> str:
    """Speedup (efficiency); a speedup beyond the nonzero-MAC bound is bracketed, since only a
    stalled ONNX Runtime turn can produce it."""
    if cell is None:
        return "-"
    text = f"{cell['speedup']:.2f}x ({cell['efficiency']:.2f})"
    return f"beyond bound: {text}" if cell["efficiency"] > 1 else text


def sparse_onnx_engine_section() -> str:
    name = "sparse_runtime_onnx_engine"
    data = load(name)
    args = data["args"]
    rows = []
    for model, cells in data["models"].items():
        for threads in args["threads"]:
            for density in args["densities"]:
                rows.append([TITLES.get(model, model), density, threads, *(
                    _speedup_cell(cells.get(f"d{density:g}-t{threads}-b{batch}"))
                    for batch in args["batches"])])
    return "\n".join([
        "### The sparse engine on exported ONNX", "",
        command_of(data, name) + " The engine loads the exported model.onnx (not the PyTorch "
        "module); random irregular masks; the 2-thread rows predate the per-batch thread split. "
        "Speedup over ONNX Runtime dense, in brackets efficiency against the nonzero-MAC bound. "
        "A cell marked \"beyond bound\" exceeds what skipping zeros can give: ONNX Runtime "
        "stalled on the loaded machine during that turn; rerun on a quiet machine before "
        "quoting it. See [sparse-runtime.md](sparse-runtime.md).", "",
        table(["model", "density", "threads", *(f"batch {b}" for b in args["batches"])],
              rows)]) + "\n"


def _side_by_side_cell(cell: dict | None) -> str:
    """The engine's cell (as `_speedup_cell`), then DeepSparse's."""
    text = _speedup_cell(cell)
    if cell is not None and "deepsparse_speedup" in cell:
        text += f" / {cell['deepsparse_speedup']:.2f}x ({cell['deepsparse_efficiency']:.2f})"
    return text


def sparse_side_by_side_section() -> str:
    name = "sparse_engine_side_by_side"
    data = load(name)
    args = data["args"]
    rows = []
    for model, cells in data["models"].items():
        for masks in args["masks"]:
            for threads in args["threads"]:
                for density in args["densities"]:
                    key = f"{masks}-d{density:g}-t{threads}-b"
                    first = cells.get(f"{key}{args['batches'][0]}")
                    if first is None:
                        continue
                    rows.append([TITLES.get(model, model), masks,
                                 f"{first['nonzero_mac_bound']:.1f}x", threads,
                                 *(_side_by_side_cell(cells.get(f"{key}{b}"))
                                   for b in args["batches"])])
    version = next((c.get("deepsparse_version") for cells in data["models"].values()
                    for c in cells.values() if c.get("deepsparse_version")), None)
    return "\n".join([
        "### The sparse engine beside DeepSparse, on DNR-trained masks", "",
        command_of(data, name) + " Each cell: the engine's speedup over ONNX Runtime dense "
        "(the same graph, zeros stored), in brackets its efficiency against the nonzero-MAC "
        f"bound; after the slash DeepSparse {version or '(not run)'}'s, timed in turns in the "
        "same run (its own venv: `make deepsparse`). \"dnr\" masks come from short DNR runs "
        "at 32x32 (`benchmarks/dnr_masks.py`), which keep the early, MAC-heavy layers dense, "
        "so their bound is far below 20x; \"random\" masks are uniform. Threads pinned to "
        "as many cores. See [sparse-runtime.md](sparse-runtime.md).", "",
        table(["model", "masks", "bound", "threads",
               *(f"batch {b}" for b in args["batches"])], rows), "",
        _threads_over_one(data), _winograd_ab(), "", _codegen_ab(), "", _layer_by_layer(), "",
        _generated_code()]) + "\n"


def _layer_by_layer() -> str:
    """The engine's steps beside DeepSparse's layers, matched by the convs they compute."""
    name = "deepsparse_layers"
    data = load(name)
    rows = []
    for model, result in data["models"].items():
        for row in result["rows"]:
            method = "-" if row.get("density") is None else \
                "Winograd" if row["winograd"] else "sparse"
            rates = "-" if row.get("gmacs") is None else \
                f"{row['gmacs']:.0f} / {row['deepsparse_gmacs']:.0f}"
            rows.append([TITLES.get(model, model), row["deepsparse_layer"],
                         ", ".join(row["steps"]) or "-",
                         "-" if row.get("density") is None else f"{row['density']:.2f}", method,
                         f"{row['ms']:.2f}", f"{row['deepsparse_ms']:.2f}",
                         "-" if row["deepsparse_time_over_ours"] is None
                         else f"{row['deepsparse_time_over_ours']:.2f}", rates])
        rows.append([TITLES.get(model, model), "**whole call**", "", "", "",
                     f"{result['call_ms_p50']:.2f}", f"{result['deepsparse_total_ms']:.2f}",
                     f"{result['deepsparse_total_ms'] / result['call_ms_p50']:.2f}", ""])
    batch = next(iter(data["models"].values()))["batch"]
    return "\n".join([
        f"Layer by layer at batch {batch}, 1 thread, DNR-trained masks: "
        + command_of(data, name) + " DeepSparse's side is its own debug analysis, which fuses "
        "some layers (\"pyramid\"); each row is one of its layers that computes a conv, beside "
        "the engine's steps that compute the same convs. Density: nonzero over dense MACs. "
        "GMAC/s counts nonzero multiply-adds, so Winograd (dense weights) shows its effective "
        "rate. Whole call: the engine's p50, DeepSparse's mean under its analysis.", "",
        table(["model", "DeepSparse layer", "engine steps", "density", "engine method",
               "engine ms", "DeepSparse ms", "DeepSparse time / ours", "GMAC/s engine / DS"],
              rows)])


def _generated_code() -> str:
    """Per-layer generated code (gcc as a stand-in emitter, and the engine's own emitter)
    against the sparse kernel."""
    name = "generated_code"
    data = load(name)
    rows = []
    for model, result in data["models"].items():
        for row in result["rows"]:
            in_chans, out_chans, in_hw, out_hw = row["shape"]
            kernel = "x".join(str(k) for k in row["kernel_size"])
            emitter = [f"{row['emitter_gmacs']:.1f}", f"{row['emitter_speedup']:.2f}x"] \
                if "emitter_gmacs" in row else ["-", "-"]
            rows.append([TITLES.get(model, model), row["layer"],
                         f"{in_chans} -> {out_chans}, {kernel} s{row['stride']}, "
                         f"{in_hw} -> {out_hw}", f"{row['density']:.2f}", row["block"],
                         f"{row['kernel_gmacs']:.1f}", f"{row['generated_gmacs']:.1f}",
                         f"{row['speedup']:.2f}x", emitter[0], emitter[1]])
    return "\n".join([
        "Code generated for each layer's nonzeros against the ahead-of-time sparse kernel "
        "(issue 26; 16 images, 1 thread, the same DNR-trained layers): " +
        command_of(data, name) + " gcc: C with the mask compiled in and a register block of "
        "output channels x pixels, compiled by gcc as a stand-in for an emitter (nothing of it "
        "ships). Emitter: the machine code the engine writes at load time (codegen.py), run "
        "as the engine runs it (two chunks of 8 images). Outputs equal the kernel's. GMAC/s "
        "of nonzero multiply-adds, medians of calls in turns; each layer alone, hot in cache "
        "(in the network they run slower, see [the decision page](decisions/"
        "2026-12-06-generated-code.md)).", "",
        table(["model", "layer", "shape", "density", "block", "kernel GMAC/s",
               "gcc GMAC/s", "gcc speedup", "emitter GMAC/s", "emitter speedup"], rows)])


def _threads_cell(cell: dict | None) -> str:
    if cell is None:
        return "-"
    split = f" ({cell['split']})" if "split" in cell else ""
    control = f" [{cell['control_speedup']:.2f}x]" if "control_speedup" in cell else ""
    return f"{cell['threads_speedup']:.2f}x{split}{control}"


def _threads_over_one(data: dict) -> str:
    """The engine at N threads over the engine at 1, timed in the same turns (rows of runs
    that recorded it), or nothing."""
    args, rows = data["args"], []
    for model, cells in data["models"].items():
        for key in cells:
            masks, _, threads, batch = key.split("-")
            if batch != f"b{args['batches'][0]}" or \
                    "threads_speedup" not in cells[key]:
                continue
            prefix = key[:-len(batch)]
            rows.append([TITLES.get(model, model), masks, threads[1:],
                         *(_threads_cell(cells.get(f"{prefix}b{b}")) for b in args["batches"])])
    if not rows:
        return ""
    return "\n".join([
        "The engine at 2 threads over the engine at 1 thread, both timed in the same turns "
        "(p50 of 1 thread / p50 of 2; below 1.00x, 2 threads were slower), and in brackets "
        "how the 2-thread engine's trial split the work: `layers` (OpenMP inside each layer), "
        "`images` (a chunk of images per thread) or `none` (one thread); in square brackets, "
        "where recorded, the control: a second 1-thread engine over the first, in the same "
        "turns (two identical engines part by this much here):", "",
        table(["model", "masks", "threads", *(f"batch {b}" for b in args["batches"])], rows),
        ""])


def _winograd_ab() -> str:
    """Winograd on and off in one run, on the DNR-trained VGG16 and ResNet-18."""
    data = load("winograd_ab")
    rows = [[TITLES.get(key.split("-t")[0], key.split("-t")[0]), row["threads"], row["batch"],
             f"{row['sparse_p50_ms']:.2f}", f"{row['winograd_p50_ms']:.2f}",
             f"{row['ratio']:.2f}x",
             f"{max(row['max_abs_vs_ort'].values()):.1e}"] for key, row in data["rows"].items()]
    return "\n".join([
        "Winograd F(4x4, 3x3) on the 3x3 layers where it pays, against the sparse kernel alone "
        "(p50 ms of the whole network, timed in turns; the table above has it on): "
        + command_of(data, "winograd_ab"), "",
        table(["model", "threads", "batch", "sparse kernel only", "with Winograd", "speedup",
               "max logit diff vs ORT"], rows)])


def _codegen_ab() -> str:
    """Generated code without its prefetches, and strided convs on polyphase planes, against
    the final engine, in one run."""
    data = load("codegen_ab")
    rows = [[TITLES.get(key.split("-t")[0], key.split("-t")[0]), row["threads"], row["batch"],
             f"{row['p50_ms']['final']:.2f}",
             f"{row['p50_ms']['no_prefetch']:.2f} ({row['over_final']['no_prefetch']:.3f}x)",
             f"{row['p50_ms']['split']:.2f} ({row['over_final']['split']:.3f}x)"
             + ("" if row["in_place_convs"] else ", control"),
             _steps_cell(row), row["in_place_convs"],
             f"{max(row['max_abs_vs_ort'].values()):.1e}"]
            for key, row in data["rows"].items()]
    return "\n".join([
        "Two choices of the generated code against the final engine (p50 ms of the whole "
        "network, timed in turns, DNR-trained masks; in brackets the variant's time over the "
        "final engine's): without the prefetch of the next segment's code, and with strided "
        "convs reading polyphase planes split from their input instead of the input in place. "
        "A network without strided convs read in place runs the same engine twice there: a "
        "control for the noise (\"control\"). Step minima: each step's best time over rounds "
        "taken in turns, summed; the variants' sums over the final engine's. Generated code "
        "runs only with AVX-512, so this table comes from such a machine. "
        + command_of(data, "codegen_ab"), "",
        table(["model", "threads", "batch", "final", "no prefetch", "split strided inputs",
               "step minima: no prefetch, split", "strided convs in place",
               "max logit diff vs ORT"], rows)])


def _steps_cell(row: dict) -> str:
    """The variants' summed step minima over the final engine's, where recorded."""
    ratios = row.get("steps_over_final")
    if not ratios:
        return "-"
    return f"{ratios['no_prefetch']:.3f}x, {ratios['split']:.3f}x"


def sparse_torchvision_section() -> str:
    name = "sparse_torchvision"
    data = load(name)
    rows = []
    for model, row in data["models"].items():
        if not row.get("runs"):
            rows.append([model, "no", "-", "-", "-", "-", "-"])
            continue
        rows.append([model, "yes", f"{row['max_abs']:.2g}",
                     "yes" if row["same_argmax"] else "no",
                     f"{row['ort_dense_p50_ms']:.2f}", f"{row['sparse_p50_ms']:.2f}",
                     f"{row['speedup_b1']:.2f}x"])
    shape = "x".join(map(str, data["shape"]))
    return "\n".join([
        "### The sparse engine on torchvision CNNs", "",
        command_of(data, name) + f" {shape} input, random masks at density "
        f"{data['args']['density']:g} on every conv and linear weight, exported as dnr-export "
        "does, loaded from ONNX, 1 thread, batch 1, p50 in ms. Parity is against ONNX Runtime "
        "(max |logit difference|, argmax); several nets have near-zero logits at 5% random "
        "masks, so their parity shows the graph runs, not its numerics. See "
        "[sparse-runtime.md](sparse-runtime.md).", "",
        table(["model", "runs", "max abs diff", "same argmax", "ORT dense ms", "engine ms",
               "speedup"], rows)]) + "\n"


def _int8_timing_rows(data: dict) -> list[list[str]]:
    rows = []
    for model, entry in data["models"].items():
        for timing in entry["timings"].values():
            rows.append([TITLES.get(model, model), timing["batch"], timing["threads"],
                         f"{timing['fp32_ms']:.3g}", f"{timing['int8_ms']:.3g}",
                         f"{timing['int8_speedup']:.2f}x / {timing['int8_speedup_min']:.2f}x"])
    return rows


def _int8_path_rows(data: dict) -> list[list[str]]:
    rows = []
    for model, entry in data["models"].items():
        paths = entry.get("paths_b16_t1_ms", {})
        rows.append([TITLES.get(model, model), *(f"{paths[p]:.3g}" if p in paths else "-"
                                                 for p in data["paths_supported"]),
                     f"{entry['csr_bytes_ratio']:.2f}"])
    return rows


def sparse_int8_section() -> str:
    data, rerun = load("sparse_int8"), load("sparse_int8_b16")
    header = ["model", "batch", "threads", "fp32 sparse ms", "int8 sparse ms",
              "int8 speedup (median / fastest)"]
    path_header = ["model", *(f"{p} ms" for p in data["paths_supported"]),
                   "int8 CSR / float CSR bytes"]
    return "\n".join([
        "### int8 sparse kernels against fp32 sparse kernels", "",
        command_of(data, "sparse_int8") + f" Kernel `{data['int8_kernel']}`; every conv of "
        "the CIFAR VGG16 and ResNet-18 at density 0.05 (DNR's initial random masks: speed "
        "depends on how many weights survive, not which), summed; median of the repeats, the "
        "fastest repeat beside it. With 2 threads the figures mostly measure the machine's "
        "load (OpenMP waits for a busy core). See [int8.md](int8.md).", "",
        table(header, _int8_timing_rows(data)), "",
        "Each kernel path at batch 16, 1 thread, weights in [-64, 64] so AVX2 runs too, and the "
        "int8 CSR's size against the float CSR's:", "",
        table(path_header, _int8_path_rows(data)), "",
        "A second run at batch 16: " + command_of(rerun, "sparse_int8_b16"), "",
        table(header, _int8_timing_rows(rerun)), "",
        table(path_header, _int8_path_rows(rerun))]) + "\n"


def sparse_int8_dnr_section() -> str:
    name = "sparse_int8_dnr"
    data = load(name)
    header = ["model", "batch", "threads", "fp32 sparse ms", "int8 sparse ms",
              "int8 speedup (median / fastest)"]
    path_header = ["model", *(f"{p} ms" for p in data["paths_supported"]),
                   "int8 CSR / float CSR bytes"]
    return "\n".join([
        "### int8 sparse kernels on DNR-trained masks", "",
        command_of(data, name) + f" Kernel `{data['int8_kernel']}`; every conv of the DNR "
        "VGG16 and ResNet-18 of `benchmarks/dnr_masks.py` (density 0.05 overall, the early "
        "layers far denser), summed, as in the table above. See [int8.md](int8.md).", "",
        table(header, _int8_timing_rows(data)), "",
        "Each kernel path at batch 16, 1 thread, weights in [-64, 64]:", "",
        table(path_header, _int8_path_rows(data))]) + "\n"


def int8_whole_network_section() -> str:
    runs = {name: load(name) for name in ("int8_whole_network", "int8_whole_network_t2")}
    rows = [[TITLES.get(model, model), row["batch"], row["threads"],
             *(f"{row[f'{key}_ms']:.3g}" for key in ("sparse_fp32", "int8_graph",
                                                       "ort_fp32_dense", "ort_int8_dense")),
             f"{row['int8_graph_vs_ort_int8_max_abs']:.2g}"]
            for data in runs.values() for model, entry in data["models"].items()
            for row in entry.values()]
    return "\n".join([
        "### Whole networks: int8 and fp32, sparse and dense", "",
        " ".join(command_of(data, name) for name, data in runs.items()) + " The DNR VGG16 "
        "and ResNet-18 of `benchmarks/dnr_masks.py`, exported float and with `--quantize "
        "int8`; p50 in ms, the four runtimes in turns. `Int8Graph` (what `--runtime "
        "sparse` runs on an int8 deploy dir) runs the int8 sparse kernels over the int8 deploy "
        "dir's graph, uint8 CHWN between layers, its steps outside the kernels in numpy on one "
        "thread; its logits are compared with ONNX Runtime's int8 session. See "
        "[int8.md](int8.md).", "",
        table(["model", "batch", "threads", "sparse engine fp32", "Int8Graph (int8 sparse)",
               "ORT fp32 dense", "ORT int8 dense", "Int8Graph vs ORT int8, max abs"],
              rows)]) + "\n"


def _stage(stages: dict, key: str) -> str:
    return pct(stages.get(key))


# the runs each robustness file attacked, and what scored the int8 side
ROBUSTNESS_RUNS = {
    "sparse_int8_robustness_engine": (
        "Three default irregular DNR runs at 20x, 20 epochs (`benchmarks/capacity.py`'s "
        "`dnr-gradual-d0.05-sS-e20`, S = 0, 1, 2), attacked at dnr-verify's default budget "
        "(the AutoAttack-grade ensemble, Square at 5,000 queries); the int8 side with "
        "`--runtime sparse`, so its verdicts and Square's queries are the int8 sparse engine's "
        "(`Int8Graph`)"),
    "sparse_int8_robustness": (
        "An earlier, lighter run: three default irregular runs (`dnr-compress --granularity "
        "irregular --density 0.05 --epochs 8 --seed S`, S = 0, 1, 2) at APGD 10 steps and "
        "Square 100 queries, the int8 side scored by ONNX Runtime's int8 session"),
}


def sparse_int8_robustness_section() -> str:
    parts = ["### int8 sparse artifacts under attack", ""]
    for name, runs in ROBUSTNESS_RUNS.items():
        parts += [_robustness_table(name, runs), ""]
    return "\n".join(parts[:-1]) + "\n"


def _robustness_table(name: str, runs: str) -> str:
    data = load(name)
    rows = []
    for run, entry in data["runs"].items():
        fp32, int8 = entry["float"], entry["int8"]
        stages = int8["stages"]
        sparse = entry["quantization"].get("sparse_int8", {})
        rows.append([
            run, f"{pct(fp32['clean'])} / {pct(int8['clean'])}",
            f"{pct(fp32['worst_case'])} / {pct(int8['worst_case'])}",
            ", ".join(_stage(stages, f"model:{a}") for a in ("apgd-ce", "apgd-t", "square"))
            + "; " + ", ".join(_stage(stages, f"transfer:{a}") for a in ("apgd-ce", "apgd-t")),
            f"{entry['int8_sparse_vs_ort_reference_max_abs']:.3g}",
            pct(entry["int8_sparse_clean"]),
            f"{sparse['bytes_vs_float_csr']:.3f}" if "bytes_vs_float_csr" in sparse else "-"])
    modes = sorted({f"{entry['quantization']['reduce_range']} "
                    f"({entry['quantization']['reduce_range_reason']})"
                    for entry in data["runs"].values()})
    worst = [100 * (e["int8"]["worst_case"] - e["float"]["worst_case"])
             for e in data["runs"].values()]
    clean = [100 * (e["int8"]["clean"] - e["float"]["clean"]) for e in data["runs"].values()]
    return "\n".join([
        command_of(data, name) + f" {runs}. Each run exported float and `--quantize int8` "
        f"(reduce_range {', '.join(modes)}), attacked by dnr-verify on the whole test split; "
        "accuracies in %. The int8 stages are white-box through the int8 graph (APGD-CE, "
        "APGD-T, Square) and transferred from the float graph (APGD-CE, APGD-T). Drift: the "
        "int8 sparse kernels (`Int8Graph`) against ONNX Runtime's reference int8 math, largest "
        f"logit difference. int8 minus float, mean over the runs: worst case "
        f"{statistics.mean(worst):+.2f} points (each run: "
        f"{', '.join(f'{w:+.2f}' for w in worst)}), clean {statistics.mean(clean):+.2f}. "
        "See [int8.md](int8.md).", "",
        table(["run", "clean float / int8", "worst case float / int8",
               "int8 stages: white-box CE, T, Square; transfer CE, T", "sparse int8 drift",
               "sparse int8 clean", "weights.int8.npz / weights.csr.npz"], rows)])
