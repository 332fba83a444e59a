"""Latency of the deployed ONNX model against its baseline (what `dnr-bench` runs).

Each model gets its own ONNX Runtime session (explicit provider and options, recorded), a
warm-up, then `runs` timed calls per batch size on fixed random inputs in [0, 1], the models
taking turns call by call: p50 / p90 / p99 latency and throughput. Against the baseline (the
deploy dir's baseline.onnx, or the model.onnx of another deploy dir given as `baseline`):
speedup = baseline p50 / model p50, MAC ratio = baseline MACs / deployed MACs, efficiency =
speedup / MAC ratio. Efficiency 1 means time fell exactly as fast as arithmetic; it rarely
exceeds 1, since a kernel cannot skip work it is handed: caches make a smaller network a little
more than proportionally faster at most (ratios up to about 1.1 measured here), so an efficiency
above `EFFICIENCY_LIMIT` is an error, never a figure: bench.json records null and the reason
("efficiency_error"), and the table says so. Both MAC counts are the graphs' own
(`deploydir.graph_sizes`), never the manifest's, so a forged manifest cannot inflate it (the
audit saw "efficiency 3.22 (limit 1)" from another network's MACs); what remains is timing: on
the 2-core machine, tiny digits nets at --runs 2 measured 2.42, which an exit code would turn
into a flaky failure. Irregular runs keep the dense shapes
in ONNX Runtime (sparse initializers are densified at load, DESIGN.md section 7), so their MAC
ratio is 1; the ratio a sparse kernel could reach is reported beside it.

Timing is for benchmarks, not tests: nothing asserts a latency.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dnr_deploy import deploydir
from dnr_deploy.compress.checkpoint import write_json
from dnr_deploy.deploydir.manifest import format_classes
from dnr_deploy.progress import terminal_progress
from dnr_deploy.resources import check_fits
from dnr_deploy.runtime import plots
from dnr_deploy.runtime.bench_config import BenchConfig, BenchError
from dnr_deploy.runtime.runtimes import (
    Runtime,
    RuntimeChoiceError,
    SparseUnsupportedError,
    check_parity,
    choose_runtime,
    open_sparse,
    parity_reference,
    sparse_info,
)
from dnr_deploy.runtime.session import create_session, run_logits

BENCH_FORMAT = "dnr-deploy/bench/1"
BENCH_JSON = "bench.json"
LATENCY_PNG = "bench_latency.png"
EFFICIENCY_LIMIT = 1.5  # see the module docstring


@dataclass
class BenchResult:
    report: dict
    out_dir: Path


@dataclass(frozen=True)
class _Target:
    """One ONNX file to time and the size figures that go with it."""

    label: str
    path: Path
    bytes: int
    params: int | None
    macs: int | None  # counted on the graph itself (`deploydir.graph_sizes`)
    peak_bytes_per_image: int
    shown: str = ""  # how the table names it (another deploy dir's model.onnx needs its folder)


def time_sessions(sessions: dict, x: np.ndarray, warmup: int, runs: int,
                  turn: int = 1) -> dict[str, dict]:
    """Latency statistics of each session on `x`, after `warmup` untimed calls each.

    The sessions take turns (the order flips every round), so a slow spell of the machine
    (another process, frequency scaling) lands on every model alike instead of on whichever
    happened to be timed then. A turn is one call, or with `turn` > 1 that many timed calls
    after one untimed one: then each session is timed with its own weights in cache, as when
    it is deployed alone, instead of right after the other evicted them (which costs a model
    whose weights fit the caches, such as a sparse one, and not one whose weights never do).
    """
    feed = {deploydir.INPUT_NAME: x}
    labels = list(sessions)
    for label in labels:
        for _ in range(warmup):
            sessions[label].run([deploydir.OUTPUT_NAME], feed)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for index in range(-(-runs // turn)):
        for label in labels if index % 2 == 0 else labels[::-1]:
            if turn > 1:
                sessions[label].run([deploydir.OUTPUT_NAME], feed)
            for _ in range(min(turn, runs - index * turn)):
                begin = time.perf_counter_ns()
                sessions[label].run([deploydir.OUTPUT_NAME], feed)
                times[label].append((time.perf_counter_ns() - begin) / 1e6)
    return {label: _stats(np.array(values), len(x)) for label, values in times.items()}


def _stats(times_ms: np.ndarray, batch: int) -> dict:
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(times_ms.mean()), "min_ms": float(times_ms.min()),
            "throughput_ips": float(batch / (p50 / 1e3))}


def bench(config: BenchConfig) -> BenchResult:
    """Time the deploy dir `config` names (and its baseline); write bench.json and a plot.

    Raises:
        BenchError, DeployDirError, ManifestError, SessionError: bad input (every file is
            checked against the manifest's sha256 before any is loaded); nothing is written.
    """
    config = config.validated()
    deploy = deploydir.open_deploy_dir(config.deploy_dir, config.verify_key)
    targets = [_model_target(deploy)]
    if deploy.has(deploydir.FP32_MODEL_FILE):  # an int8 model.onnx: time its float original
        targets.append(_model_target(deploy, deploydir.FP32_MODEL_FILE, "float"))
    baseline = _baseline_target(deploy, config.baseline, config.verify_key)
    if baseline is not None:
        targets.append(baseline)
    shape = [int(n) for n in deploy.manifest["input_shape"]]
    _check_memory(targets, shape, config)
    sessions = {t.label: create_session(t.path, config.provider, config.threads) for t in targets}
    rng = np.random.default_rng(config.seed)
    inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in config.batch_sizes()}
    runners = {label: s for label, (s, _) in sessions.items()}
    chosen, why = choose_runtime(config.runtime, deploy.manifest, config.provider)
    runtime = {"name": Runtime.ORT.value, "chosen_by": why}
    if chosen is Runtime.SPARSE:
        try:
            runners["model"], runtime = _sparse_runner(deploy, config.threads, runners["model"],
                                                       inputs, config.verify_key, config.model,
                                                       config.trust_model_code)
            runtime["chosen_by"] = why
        except SparseUnsupportedError as err:
            if config.runtime != Runtime.AUTO:
                raise BenchError(str(err)) from None
            runtime["fallback"] = f"auto: ONNX Runtime, since {err}"
    say = terminal_progress("dnr-bench: ") or (lambda line: None)
    timed = {}
    for b, x in inputs.items():
        say(f"batch {b}: {config.warmup} warm-up + {config.runs} timed calls of each model")
        timed[b] = time_sessions(runners, x, config.warmup, config.runs, config.turn)
    models = {t.label: {"file": t.shown or t.path.name, "path": str(t.path.resolve()),
                        "bytes": t.bytes, "params": t.params, "macs": t.macs,
                        "latency": {str(b): timed[b][t.label] for b in inputs}}
              for t in targets}
    report = {
        "format": BENCH_FORMAT,
        "deploy_dir": str(deploy.path.resolve()),
        "granularity": deploy.manifest.get("granularity"),
        "class_names": deploy.manifest.get("class_names"),
        "input_shape": shape,
        "models": models,
        "comparison": _compare(models, deploy.manifest) if baseline is not None else None,
        "int8_vs_float": _int8_vs_float(models, runtime, deploy.manifest)
        if "float" in models else None,
        "runtime": runtime,
        "signature": deploy.signature,
        "session": sessions[targets[0].label][1].as_dict(),
        "machine": machine_info(),
        "config": asdict(config),
    }
    out_dir = deploydir.reports_dir(deploy, config.out)
    plots.save_latency_plot(out_dir / LATENCY_PNG, models)
    report["plot"] = LATENCY_PNG
    write_json(out_dir / BENCH_JSON, report)
    return BenchResult(report, out_dir)


def _check_memory(targets: list[_Target], shape: list[int], config: BenchConfig) -> None:
    """Refuse batch sizes whose inputs (all held at once) and activations (each session's
    arena keeps its largest batch's) would not fit in memory, before allocating any.

    Raises:
        BenchError: naming the estimate and the memory available.
    """
    sizes = config.batch_sizes()
    inputs = sum(sizes) * 4 * int(np.prod(shape))
    activations = max(sizes) * sum(t.peak_bytes_per_image for t in targets)
    check_fits(inputs + activations, f"--batch {config.batch} ({len(targets)} model(s), "
               f"{shape} images)", "use smaller batch sizes", BenchError)


def _sparse_runner(deploy: deploydir.DeployDir, threads: int, session,
                   inputs: dict[int, np.ndarray], verify_key: str | None = None,
                   model_spec: str | None = None, trust_model_code: bool = False) -> tuple:
    """The sparse runtime's model, once its logits match ONNX Runtime's on every input (an int8
    one's: its reference int8 math, `runtimes.parity_reference`)."""
    try:
        model = open_sparse(deploy.path, threads, verify_key, model_spec, trust_model_code)
        reference, atol = parity_reference(model, deploy.path, deploy.manifest, session)
        parity = [check_parity(model(x), run_logits(reference, x), f"the batch-{b} inputs",
                               atol) for b, x in inputs.items()]
    except SparseUnsupportedError:
        raise
    except RuntimeChoiceError as err:
        raise BenchError(str(err)) from None
    worst = max(parity, key=lambda p: p["max_abs"])
    return model, {**sparse_info(model, threads), "parity": worst,
                   "macs": model.macs(deploy.manifest["input_shape"])}


def _model_target(deploy: deploydir.DeployDir, name: str = deploydir.MODEL_FILE,
                  label: str = "model") -> _Target:
    """A deployed graph (model.onnx, or an int8 one's model.fp32.onnx: same params and MACs)."""
    manifest = deploy.manifest
    path = deploy.file(name)
    graph = deploy.graphs[path.name]
    return _Target(label, path, manifest["files"][path.name]["bytes"],
                   (manifest.get("params") or {}).get("deployed"), graph.macs,
                   graph.peak_bytes_per_image)


def _baseline_target(deploy: deploydir.DeployDir, other: str | None,
                     verify_key: str | None = None) -> _Target | None:
    """The deploy dir's own baseline.onnx, or the model.onnx of the deploy dir `other` (held
    to the same `verify_key`: it is loaded into ONNX Runtime too)."""
    if other is None:
        if not deploy.has(deploydir.BASELINE_FILE):
            return None
        manifest = deploy.manifest
        path = deploy.path / deploydir.BASELINE_FILE
        graph = deploy.graphs[path.name]
        return _Target("baseline", path, manifest["files"][path.name]["bytes"],
                       (manifest.get("params") or {}).get("dense"), graph.macs,
                       graph.peak_bytes_per_image)
    if not Path(other).is_dir():
        raise BenchError(f"--baseline {other!r} is not a folder; name another deploy dir "
                         "(e.g. the export of a --dense run)")
    base = deploydir.open_deploy_dir(other, verify_key)
    if list(base.manifest["input_shape"]) != list(deploy.manifest["input_shape"]):
        raise BenchError(f"--baseline {other!r} takes {base.manifest['input_shape']} inputs, the "
                         f"deployed model {deploy.manifest['input_shape']}")
    target = _model_target(base)
    return _Target("baseline", target.path, target.bytes, target.params, target.macs,
                   target.peak_bytes_per_image, shown=f"{base.path.name}/{target.path.name}")


def _compare(models: dict, manifest: dict) -> dict:
    """Speedup, MAC ratio and efficiency per batch size (see the module docstring)."""
    model, base = models["model"], models["baseline"]
    mac_ratio = base["macs"] / model["macs"] if base["macs"] and model["macs"] else None
    macs = manifest.get("macs") or {}
    sparse_ratio = None
    if macs.get("nonzero") and macs["nonzero"] < macs.get("executed", 0) and base["macs"]:
        sparse_ratio = base["macs"] / macs["nonzero"]  # irregular: what a sparse kernel could do
    per_batch = {}
    for batch, stats in model["latency"].items():
        speedup = base["latency"][batch]["p50_ms"] / stats["p50_ms"]
        row = {"speedup": speedup, "mac_ratio": mac_ratio,
               "efficiency": speedup / mac_ratio if mac_ratio else None}
        if row["efficiency"] is not None and row["efficiency"] > EFFICIENCY_LIMIT:
            row["efficiency_error"] = (
                f"{row['efficiency']:.2f} is above its physical limit {EFFICIENCY_LIMIT:g}: "
                "the timing was disturbed or costs besides the counted MACs dominate; not a "
                "figure (rerun with more --runs on a quiet machine)")
            row["efficiency"] = None
        if sparse_ratio:
            row.update(sparse_kernel_mac_ratio=sparse_ratio,
                       sparse_kernel_efficiency=speedup / sparse_ratio)
        per_batch[batch] = row
    size_ratio = base["bytes"] / model["bytes"] if model["bytes"] else None
    return {"file_size_ratio": size_ratio, "mac_ratio": mac_ratio,
            "sparse_kernel_mac_ratio": sparse_ratio, "per_batch": per_batch}


def _int8_vs_float(models: dict, runtime: dict, manifest: dict) -> dict:
    """An int8 deploy dir: how much smaller and faster the int8 model is than model.fp32.onnx.
    The files compared are those that run: model.onnx against model.fp32.onnx in ONNX
    Runtime; the int8 CSR against the float CSR in the sparse runtime (an irregular dir's
    int8 model.onnx is a dense QDQ graph, larger than its sparse float original)."""
    model, original = models["model"], models["float"]
    files = manifest["files"]
    from dnr_deploy.export.sparse_int8 import INT8_CSR_FILE

    compared = (INT8_CSR_FILE, deploydir.CSR_FILE) if runtime.get("dtype") == "int8" \
        else (deploydir.MODEL_FILE, deploydir.FP32_MODEL_FILE)
    return {"files": list(compared),
            "file_size_ratio": files[compared[1]]["bytes"] / files[compared[0]]["bytes"],
            "speedup": {batch: original["latency"][batch]["p50_ms"] / stats["p50_ms"]
                        for batch, stats in model["latency"].items()}}


def machine_info() -> dict:
    """Where the figures were measured: CPU, core count, OS and library versions."""
    import onnx
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines
                if line.startswith("model name")), cpu)
    flags = next((set(line.split(":", 1)[1].split()) for line in lines
                  if line.startswith("flags")), flags)
    # the vector extensions the kernels pick from: one "AMD EPYC" was a Zen 4 with AVX-512 and
    # a Zen 3 with AVX2 only, and figures of one do not hold for the other
    vectors = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else \
        "unknown" if not flags else "none"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": cpu, "vectors": vectors, "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": affinity, "os": platform.platform(),
            "python": sys.version.split()[0],
            "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                         "numpy": np.__version__}}


def format_table(report: dict) -> str:
    """The screen summary: one row per model and batch size, then the comparison."""
    session = report["session"]
    config = report["config"]
    lines = [
        f"deploy dir: {report['deploy_dir']} ({report['granularity']})",
        f"  {_runtime_line(report)}{session['providers'][0]}, "
        f"{session['intra_op_num_threads']} intra-op thread(s), "
        f"{config['runs']} timed runs after {config['warmup']} warm-up, "
        f"onnxruntime {session['onnxruntime']}, {report['machine']['cpu']}",
        *([f"  {format_classes(report['class_names'])}"] if report.get("class_names") else []),
        f"  {'file':<15}{'KiB':>9}{'params':>12}{'MACs':>13}{'batch':>7}{'p50 ms':>10}"
        f"{'p90 ms':>10}{'p99 ms':>10}{'img/s':>11}",
    ]
    for model in report["models"].values():
        first = True
        for batch, stats in model["latency"].items():
            head = (f"{model['file']:<15}{model['bytes'] / 1024:>9.1f}"
                    f"{_count(model['params']):>12}{_count(model['macs']):>13}") if first \
                else " " * 49
            lines.append(f"  {head}{batch:>7}{stats['p50_ms']:>10.3f}{stats['p90_ms']:>10.3f}"
                         f"{stats['p99_ms']:>10.3f}{stats['throughput_ips']:>11.0f}")
            first = False
    comparison = report["comparison"]
    if comparison:
        for batch, row in comparison["per_batch"].items():
            efficiency = (f"efficiency ERROR: {row['efficiency_error']}"
                          if row.get("efficiency_error") else
                          f"efficiency {_number(row['efficiency'])} (ideal 1)")
            text = (f"  vs baseline, batch {batch}: speedup {row['speedup']:.2f}x, MAC ratio "
                    f"{_ratio(row['mac_ratio'])}, {efficiency}")
            if row.get("sparse_kernel_mac_ratio"):
                text += (f"; a sparse kernel's MAC ratio {row['sparse_kernel_mac_ratio']:.1f}x, "
                         f"efficiency against it {row['sparse_kernel_efficiency']:.2f}")
            lines.append(text)
        lines.append(f"  file size: {_ratio(comparison['file_size_ratio'])} smaller")
    else:
        lines.append("  no baseline: export with --baseline or pass --baseline DEPLOY_DIR")
    int8 = report.get("int8_vs_float")
    if int8:
        speedups = ", ".join(f"batch {b} {x:.2f}x" for b, x in int8["speedup"].items())
        ratio, (ours, theirs) = int8["file_size_ratio"], int8["files"]
        size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
        lines.append(f"  int8 vs float (model.fp32.onnx): speedup {speedups}; {ours} {size} "
                     f"than {theirs}")
    return "\n".join(lines)


def _runtime_line(report: dict) -> str:
    runtime = report.get("runtime") or {}
    if runtime.get("name") != Runtime.SPARSE.value:
        return ""
    kind, against = ("int8 sparse runtime", "ONNX Runtime's reference int8 math") \
        if runtime.get("dtype") == "int8" else ("sparse runtime", "ONNX Runtime")
    winograd, single = runtime.get("winograd_layers"), runtime.get("winograd_layers_single")
    algorithm = f", Winograd on {winograd} of {runtime['layers']} layers from 4 images" \
        f" and {single or 0} on single images" if winograd or single else ""
    generated = runtime.get("generated_code_layers")
    if generated:  # its own code on 16-float calls; where Winograd also pays, the faster one
        algorithm += f", generated code on {generated} of {runtime['layers']} layers"
    return (f"model in the {kind} ({runtime['kernel']} kernel{algorithm}, parity with "
            f"{against} {runtime['parity']['max_abs']:.1e}), baseline in ")


def _count(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _number(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"
