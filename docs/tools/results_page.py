"""docs/results.md, and the README's one results table, from benchmarks/results/*.json.

No figure on either page is typed by hand: each table is rendered here from the JSON a
benchmark script wrote, beside the command that wrote it. Standard library only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# What each method key of benchmarks/common.py METHODS means (the dnr-compress settings).
LABELS = {
    "dense": "dense PGD-AT (`--dense`)",
    "dnr-gradual": "DNR irregular, dense start (the default)",
    "dnr-irregular": "DNR irregular, sparse start (the paper's; `--start-density` = density)",
    "dnr-channel": "DNR channel (the default: sparse start, cost shares, frozen at 35%)",
    "dnr-channel-until0.75": "DNR channel, cost shares, frozen at 75% (`--rewire-until 0.75`)",
    "dnr-channel-size": "DNR channel, size shares, frozen at 75% (the default before stop 23)",
    "dnr-channel-gradual": "DNR channel, dense start (`--start-density 1.0`, frozen at 75%)",
    "static": "static random masks (uniform; `--method static --init uniform`)",
    "static-channel": "static random channels (`--method static --granularity channel`)",
    "magnitude": "magnitude prune-then-finetune (`--method magnitude`)",
}


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float]) -> str:
    """As benchmarks/common.py prints it: mean +/- sample std over seeds, in percent."""
    if len(values) == 1:
        return pct(values[0])
    return f"{100 * statistics.mean(values):.1f} +/- {100 * statistics.stdev(values):.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_of(data: dict, name: str) -> str:
    """The recorded command (run from benchmarks/) and the file, for the text under a title."""
    seeds = data.get("args", {}).get("seeds")
    if isinstance(seeds, list) and "--seeds" not in data["command"]:
        note = f" (seeds {' '.join(map(str, seeds))})"
    else:
        note = ""
    machine = data.get("machine", {})
    # recorded from 2026-12-07: the host's CPU changes between AVX-512 and AVX2-only machines
    where = f" Measured on {machine['cpu']} with {VECTORS.get(machine['vectors'], 'no')} " \
        "vectors." if machine.get("vectors") else ""
    return (f"`cd benchmarks; {data['command']}`{note}; raw rows in "
            f"`benchmarks/results/{name}.json`.{where}")


VECTORS = {"avx512": "AVX-512", "avx2": "AVX2", "unknown": "unrecorded"}


def method_row(method: str, rows: list[dict], label: str | None = None) -> list[str]:
    def column(key: str) -> list[float]:
        return [row[key] for row in rows]

    return [label or LABELS.get(method, method), len(rows), mean_std(column("clean")),
            mean_std(column("pgd20")), f"**{mean_std(column('autoattack'))}**",
            f"{statistics.mean(column('compression')):.1f}x",
            f"{statistics.mean(column('mac_reduction')):.1f}x"]


QUALITY_HEADER = ["method", "seeds", "clean", "PGD-20", "**AutoAttack-grade**",
                  "compression (params)", "MAC reduction"]


def quality_section(title: str, name: str, text: str = "", labels: dict | None = None) -> str:
    data = load(name)
    rows = [method_row(method, runs, (labels or {}).get(method))
            for method, runs in data["rows"].items()]
    paired = data.get("paired_vs_first")
    parts = [f"### {title}", "", command_of(data, name)]
    if data.get("variant"):
        parts += ["", f"Variant: {data['variant']}"]
    if text:
        parts += ["", text]
    parts += ["", table(QUALITY_HEADER, rows)]
    if paired:
        first = next(iter(data["rows"]))
        parts += ["", f"Ensemble accuracy minus `{first}`'s, seed for seed (mean +/- standard "
                  "error, in points):", "",
                  table(["method", "difference", "seeds ahead", "seeds tied"],
                        [[f"`{method}`", f"{100 * p['mean']:+.2f} +/- "
                          f"{100 * p['standard_error']:.2f}", p["seeds_ahead"], p["seeds_tied"]]
                         for method, p in paired.items()])]
    return "\n".join(parts) + "\n"


def sparse_speed() -> str:
    """The sparse engine against ONNX Runtime dense on DNR-trained masks, 1 thread, batch 1 and
    16, with DeepSparse's figure beside it (for the README's results block)."""
    data = load("sparse_engine_side_by_side")
    models, machine = data["models"], data.get("machine", {})
    parts = []
    for model, title in (("vgg16", "VGG16"), ("resnet18", "ResNet-18")):
        one, sixteen = models[model]["dnr-d0.05-t1-b1"], models[model]["dnr-d0.05-t1-b16"]
        parts.append(f"{title} {one['speedup']:.1f}x at batch 1 and {sixteen['speedup']:.1f}x "
                     f"at batch 16, of a possible {one['nonzero_mac_bound']:.1f}x (DeepSparse "
                     f"1.8: {one['deepsparse_speedup']:.1f}x and "
                     f"{sixteen['deepsparse_speedup']:.1f}x)")
    where = f", on {machine['cpu']} with {VECTORS[machine['vectors']]} vectors" \
        if machine.get("vectors") in VECTORS else ""
    return ("on DNR-trained masks at 20x, whose dense early layers keep many multiply-adds, "
            f"1 thread{where}, against ONNX Runtime dense: " + "; ".join(parts))


def readme_block() -> str:
    """The README's one table: the defaults against dense and the baselines at 5%, and speed."""
    quality, gradual = load("quality_d0.05"), load("quality_d0.05_gradual")
    seeds10 = load("quality_d0.05_channel_10seeds")
    deployment = load("deployment")["paper_architectures"]
    picks = [("dense", quality), ("dnr-gradual", gradual), ("dnr-channel", seeds10),
             ("static", quality), ("magnitude", quality), ("static-channel", seeds10)]
    labels = {"dense": "dense PGD-AT", "dnr-gradual": "**DNR irregular (default)**",
              "dnr-channel": "**DNR channel (`--granularity channel`)**",
              "static": "static random masks", "magnitude": "magnitude prune-then-finetune",
              "static-channel": "static random channels"}
    rows = [method_row(method, data["rows"][method], labels[method]) for method, data in picks]
    speed = []
    for model, title in (("resnet18", "ResNet-18"), ("vgg16", "VGG16")):
        dense, channel = deployment[model]["dense"], deployment[model]["channel 0.05"]
        speed.append(f"{title} {channel['b1']['speedup']:.1f}x at batch 1, "
                     f"{channel['b64']['speedup']:.1f}x at batch 64, file "
                     f"{dense['bytes'] / channel['bytes']:.0f}x smaller")
    return "\n".join([
        "Embedded default (digits, `small` net, eps 0.2, 20 epochs, density 0.05 = about 20x "
        "fewer parameters); robust accuracy is the AutoAttack-grade ensemble on all 360 test "
        "images, mean +/- std over seeds, in %:", "",
        table(QUALITY_HEADER, rows), "",
        "Deployment speed in ONNX Runtime (1 thread, 32x32 input, channel masks at 5% of the "
        "parameters, as DNR's budget counts them) against the dense network: "
        + "; ".join(speed) + ". Irregular masks shrink the file but not the time in ONNX "
        "Runtime; the sparse engine (`--runtime auto`, the default for them) runs only the "
        "nonzeros: " + sparse_speed() + " ([docs/sparse-runtime.md](docs/sparse-runtime.md)).",
        "",
        "Sources: `quality_d0.05.json`, `quality_d0.05_gradual.json`, "
        "`quality_d0.05_channel_10seeds.json`, `deployment.json`, "
        "`sparse_engine_side_by_side.json` in `benchmarks/results/`; "
        "every table with its command: [docs/results.md](docs/results.md).",
    ]) + "\n"


def robustness_section() -> str:
    data = load("robustness")
    attacks = [("clean", "clean"), ("pgd", "PGD-20"), ("apgd-ce", "APGD-CE, 100 steps"),
               ("apgd-t", "APGD-T, 100 steps, 9 targets"), ("square", "Square, 5,000 queries"),
               ("autoattack", "**ensemble (worst case per image)**")]
    methods = list(data["rows"])
    rows = []
    for key, label in attacks:
        cells = []
        for method in methods:
            values = [row[key] for row in data["rows"][method] if row.get(key) is not None]
            cells.append(pct(statistics.mean(values)) if values else "-")
        rows.append([label, *cells])
    rows.append(["ensemble seconds", *(", ".join(f"{row['autoattack_seconds']:.0f}"
                                                 for row in data["rows"][m]) for m in methods)])
    return "\n".join([
        "### Robustness evaluation: each attack alone and the ensemble", "",
        command_of(data, "robustness") + " Density 0.05, DNR as it was then (once-an-epoch "
        "rewiring); robust accuracy in %, mean over seeds; seconds per seed with several jobs "
        "sharing the 2 cores.", "",
        table(["attack", *(LABELS.get(m, m).split(" (")[0] for m in methods)], rows)]) + "\n"


def sweep_section() -> str:
    data = load("sweep")
    rows = []
    for method, by_density in data["rows"].items():
        for density, runs in by_density.items():
            row = method_row(method, runs, f"`{method}`")
            rows.append([row[0], density, *row[5:6], row[1], *row[2:5], row[6]])
    return "\n".join([
        "### Compression sweep: every method from 2x to 77x", "",
        command_of(data, "sweep") + " Plot: `benchmarks/results/sweep.png`. `dnr-gradual` is "
        "DNR irregular as shipped (dense start), `dnr-irregular` the paper's sparse start.", "",
        table(["method", "density", "compression (params)", "seeds", "clean", "PGD-20",
               "**AutoAttack-grade**", "MAC reduction (nonzero)"], rows)]) + "\n"


def pilot_section() -> str:
    data = load("pilot_schedule")
    keys = ("granularity", "method", "rewire_every", "prune_rate", "rewire_until", "init", "seed")
    rows = []
    for row in data["rows"]:
        flags = " ".join(f"--{key.replace('_', '-')} {row[key]}" for key in keys if key in row)
        layers = " / ".join(f"{value:.3g}" for value in row.get("layers", {}).values())
        rows.append([row["name"], row["density"], f"`{flags}`" if flags else "",
                     pct(row["clean"]), pct(row["pgd20"]), pct(row["aa"]), layers])
    return "\n".join([
        "### The schedule pilot (single runs)", "",
        f"`{data['command']}`; raw rows in `benchmarks/results/pilot_schedule.json`. "
        f"{data['note']}.", "",
        table(["run", "density", "flags", "clean", "PGD-20", "AutoAttack-grade",
               "final layer densities (conv1 ... fc)"], rows)]) + "\n"


def tunability_section() -> str:
    data = load("tunability")
    rows = [[row["beta"], pct(row["clean"]), pct(row["pgd20"]), pct(row.get("square"))]
            for row in data["rows"]]
    return "\n".join([
        "### Tunability (beta)", "",
        command_of(data, "tunability") + " DNR irregular with the once-an-epoch schedule of "
        "the time, density 0.05, seed 0; PGD-20 and Square alone (not the ensemble). Plot: "
        "`benchmarks/results/tunability.png`.", "",
        table(["beta", "clean", "PGD-20", "Square"], rows)]) + "\n"


def latency_rows(models: dict, batches: tuple[str, ...], with_efficiency: bool) -> list[list]:
    rows = []
    for model, variants in models.items():
        dense = variants["dense"]
        for variant, figures in variants.items():
            row = [model, variant, f"{dense['macs'] / figures['macs']:.1f}x"]
            for batch in batches:
                cell = figures[batch]
                row += [f"{cell['p50_ms']:.2f} ms", f"{cell['speedup']:.2f}x"]
                if with_efficiency:
                    row.append(f"{cell['efficiency']:.2f}")
            rows.append([*row, f"{figures['bytes'] / 1e6:.2f} MB"])
    return rows


def deployment_section() -> str:
    data = load("deployment")
    header = ["model", "variant", "MAC reduction", "batch 1 p50", "speedup", "eff.",
              "batch 64 p50", "speedup", "eff.", "ONNX file"]
    trained = []
    for name, entry in data["trained_default"].items():
        comparison = entry["comparison"]
        per_batch = comparison["per_batch"]
        trained.append([f"`{name}`", f"{comparison['mac_ratio']:.2f}x",
                        *(f"{per_batch[b]['speedup']:.2f}x" for b in per_batch),
                        f"{comparison['file_size_ratio']:.1f}x"])
    return "\n".join([
        "### Deployment: latency against the MAC bound", "",
        command_of(data, "deployment") + " ONNX Runtime, CPU, 1 intra-op thread, p50 of "
        "interleaved calls; efficiency = speedup / MAC reduction (1 is the physical limit). "
        "Paper architectures at 32x32 with random masks at DNR's budget:", "",
        table(header, latency_rows(data["paper_architectures"], ("b1", "b64"), True)), "",
        "The trained default runs of the time (seed 0, against the dense run's artifact; "
        "channel with the size shares that were the default then):", "",
        table(["run", "MAC reduction", "speedup batch 1", "speedup batch 64",
               "file smaller by"], trained)]) + "\n"


def int8_section() -> str:
    data = load("int8")
    rows = []
    for model, entry in data["paper_architectures"].items():
        variants = entry["variants"]
        for variant, figures in variants.items():
            rows.append([model, variant, f"{figures['bytes'] / 1e6:.2f} MB",
                         *(f"{figures[b]['p50_ms']:.2f} ms" for b in ("b1", "b16", "b64"))])
        summary = entry["summary"]
        rows.append([model, "int8 / float", f"{summary['file_ratio_int8_vs_float']:.2f}x",
                     *(f"{summary[f'{b}_latency_ratio_int8_vs_float']:.2f}x"
                       for b in ("b1", "b16", "b64"))])
    return "\n".join([
        "### int8 on top of channel pruning", "",
        command_of(data, "int8") + " ONNX Runtime CPU, 1 intra-op thread, p50; channel masks at "
        "5%, quantized by dnr-export's own function with reduce_range (what `auto` picks on a "
        "CPU without VNNI). See [int8.md](int8.md).", "",
        table(["model", "variant", "file", "batch 1", "batch 16", "batch 64"], rows)]) + "\n"


def training_cost_section() -> str:
    data = load("training_cost")
    rows = [[LABELS.get(method, method).split(" (")[0] + (" (default)" if method ==
                                                         "dnr-gradual" else ""),
             f"{row['fastest_epoch_s']:.2f}", f"{row['vs_dense_fastest']:.2f}x",
             f"{row['median_epoch_s']:.2f}", f"{row['rewire_s_per_epoch']:.4f}"]
            for method, row in data["rows"].items()]
    return "\n".join([
        "### Training cost", "",
        command_of(data, "training_cost") + " Fresh runs; the methods take turns over the "
        "rounds (seeds 0, 1, 2); each is scored by its fastest epoch, since other jobs can "
        "only slow an epoch down.", "",
        table(["method", "fastest epoch s", "vs dense", "median epoch s", "rewire s/epoch"],
              rows)]) + "\n"


def issue11_pilots_section() -> str:
    data = load("issue11_pilots")
    keys = ("method", "granularity", "init", "prune_rate", "rewire_every", "rewire_until")
    rows = []
    for name, run in data["runs"].items():
        settings, accuracy = run["settings"], run["accuracy"]
        flags = " ".join(f"{key}={settings[key]}" for key in keys if key in settings)
        layers = " / ".join(f"{value:.3g}" for value in run["layer_densities"].values())
        rows.append([name, run["source"], settings["density"], settings["seed"], flags,
                     pct(accuracy["clean"]), pct(accuracy["pgd20"]),
                     pct(accuracy["autoattack"]), layers])
    return "\n".join([
        "### Issue 11's pilot runs (single runs, per seed)", "",
        f"`{data['command']}`; raw rows in `benchmarks/results/issue11_pilots.json`. Source "
        "`wt11`: the issue branch's runs; `main runs11`: runs of the quality benchmark read "
        "back. Notes: [decisions/2026-11-22-issue11-schedule-notes.md]"
        "(decisions/2026-11-22-issue11-schedule-notes.md).", "",
        table(["run", "source", "density", "seed", "settings", "clean", "PGD-20",
               "AutoAttack-grade", "final layer densities (conv1 ... fc)"], rows)]) + "\n"
