"""What the benchmark scripts share: cached training runs, Square accuracy, output files.

Runs are cached by their settings under --workdir (default benchmarks/results/runs, ignored by
git), so the quality, sweep and tunability scripts reuse each other's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dnr_deploy import CompressConfig, compress
from dnr_deploy.attacks.square import square_attack
from dnr_deploy.compress.checkpoint import load_checkpoint, read_run_json
from dnr_deploy.data import load_data, test_subset
from dnr_deploy.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
# the CPUs this process may use at start (pin_cpus narrows the set; this keeps the first)
_START_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin_cpus(count: int) -> list[int]:
    """Pin the calling thread, and the threads and processes it starts from now on (OpenMP's,
    ONNX Runtime's, a DeepSparse worker), to the first `count` CPUs this process was given, so
    a timing at N threads stays on N cores instead of migrating among them. Returns the CPUs
    (empty where the OS has no affinity call)."""
    if not _START_CPUS:
        return []
    cpus = _START_CPUS[:count]
    os.sched_setaffinity(0, cpus)
    return cpus

# Each method at a density, as dnr-compress settings.
METHODS: dict[str, dict] = {
    "dense": {"dense": True},
    # "target": start at the density, as the paper's DNR does (the default before the dense
    # start was measured better; the run names of both predate the switch, so caches hold)
    "dnr-irregular": {"method": "dnr", "granularity": "irregular", "start_density": "target"},
    "dnr-gradual": {"method": "dnr", "granularity": "irregular", "start_density": 1.0},
    "dnr-channel": {"method": "dnr", "granularity": "channel", "start_density": "target"},
    "dnr-channel-gradual": {"method": "dnr", "granularity": "channel", "start_density": 1.0,
                            "rewire_until": 0.75},
    # the channel default before stop 23: regrowth shares by the groups' dense rows, topology
    # frozen at 75%; the dnr-channel runs cached before then are these
    "dnr-channel-size": {"method": "dnr", "granularity": "channel", "start_density": "target",
                         "channel_shares": "size", "rewire_until": 0.75},
    # the default's cost shares with the topology frozen at 75% (the default until 0.35 won)
    "dnr-channel-until0.75": {"method": "dnr", "granularity": "channel",
                              "start_density": "target", "rewire_until": 0.75},
    "static": {"method": "static", "granularity": "irregular", "init": "uniform"},
    "static-erk": {"method": "static", "granularity": "irregular", "init": "erk"},
    "static-channel": {"method": "static", "granularity": "channel"},
    "magnitude": {"method": "magnitude", "granularity": "irregular"},
}


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workdir", default=str(RESULTS / "runs"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--square-queries", type=int, default=0,
                        help="also Square alone at this budget (0: no; the ensemble has it)")
    return parser


def announce(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)


def method_settings(method: str, density: float) -> dict:
    """CompressConfig fields of a METHODS entry at `density`."""
    settings = {**METHODS[method], "density": density}
    if settings.get("start_density") == "target":
        settings["start_density"] = density
    return settings


def run_name(method: str, density: float, seed: int, epochs: int, extra: dict) -> str:
    """The cache name of a run's settings."""
    return "-".join([method, f"d{density:g}", f"s{seed}", f"e{epochs}",
                     *(f"{k}{v:g}" if isinstance(v, float | int) else f"{k}{v}"
                       for k, v in sorted(extra.items()))])


def _take_lock(lock: Path) -> None:
    """Create `lock` holding this process's id; a lock whose process has died (a benchmark
    killed mid-run) is taken over. Raises FileExistsError while its process lives."""
    try:
        with lock.open("x") as file:
            file.write(str(os.getpid()))
        return
    except FileExistsError:
        try:  # an empty lock is an older benchmark's, which wrote no id
            os.kill(int(lock.read_text()), 0)
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return _take_lock(lock)
        raise


def trained_run(workdir: str, method: str, density: float, seed: int, epochs: int,
                wait: bool = True, **extra) -> Path | None:
    """The run dir of these settings, training it first unless a finished one is cached;
    None if another process is training it and `wait` is False."""
    settings = {**method_settings(method, density), "seed": seed, "epochs": epochs, **extra}
    name = run_name(method, density, seed, epochs, extra)
    run_dir = Path(workdir) / name
    if (run_dir / "run.json").is_file():
        return run_dir
    # a lock per run: two benchmark processes sharing the cache (capacity.py --reverse beside
    # a forward one) train each run once; the second waits for the first's run.json
    lock = run_dir.with_name(name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        _take_lock(lock)
    except FileExistsError:
        if not wait:
            return None
        print(f"  waiting for {name}, trained by another process", flush=True)
        while not (run_dir / "run.json").is_file():
            time.sleep(10)
        return run_dir
    try:
        if run_dir.exists():  # an unfinished run from an interrupted benchmark: start over
            for file in sorted(run_dir.rglob("*"), reverse=True):
                file.unlink() if file.is_file() else file.rmdir()
            run_dir.rmdir()
        started = time.perf_counter()
        compress(CompressConfig(out=str(run_dir), eval_samples=360, **settings))
        print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        lock.unlink()
    return run_dir


def load_model(run_dir: Path) -> torch.nn.Module:
    """The run's final network, in eval mode (weights only: nothing unpickled)."""
    summary = read_run_json(run_dir)
    model = create_model(summary["model"]["name"], summary["num_classes"],
                         summary["model"]["in_chans"], summary["mean"], summary["std"])
    model.load_state_dict(load_checkpoint(run_dir)["model"])
    return model.eval()


def square_accuracy(run_dir: Path, queries: int) -> float:
    """Accuracy of the run's final model under the Square Attack (black-box, score-based)
    on the whole test split at the run's eps."""
    summary = read_run_json(run_dir)
    model = load_model(run_dir)
    x, y = test_subset(load_data(summary["config"]["dataset"], summary["config"]["data_dir"]),
                       None)

    def query(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    result = square_attack(query, x.numpy(), y.numpy(), summary["threat_model"]["eps"],
                           n_queries=queries)
    return float((result.margin > 0).mean())


def row_of(run_dir: Path, square_queries: int | None) -> dict:
    summary = read_run_json(run_dir)
    row = {
        "run": run_dir.name,
        "clean": summary["accuracy"]["clean"],
        "pgd20": summary["accuracy"]["pgd20"],
        "autoattack": summary["accuracy"].get("autoattack"),
        "density": summary["density"]["achieved"],
        "compression": summary["params"]["compression"],
        "params_dense": summary["params"]["dense"],
        "mac_reduction": summary["macs"].get("reduction_nonzero",
                                             summary["macs"].get("reduction")),
        "train_s_per_epoch": summary["timing"]["train_seconds_per_epoch"],
        "rewire_s_total": summary["timing"]["rewire_seconds_total"],
        "epochs": summary["timing"]["epochs"],
        "layer_densities": summary.get("layer_densities", {}),
        "density_over_training": density_trace(run_dir),
    }
    if square_queries:
        row["square"] = square_accuracy(run_dir, square_queries)
    return row


def density_trace(run_dir: Path) -> list[dict]:
    """Per-layer densities and regrowth shares at every rewire, from metrics.jsonl."""
    file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []
    return [{"step": r["step"], "prune_fraction": r["prune_fraction"],
             "layer_densities": r["layer_densities"], "regrowth_shares": r["regrowth_shares"]}
            for row in rows for r in row.get("rewires", [])]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} +/- {100 * statistics.stdev(values):.1f}"


def paired_differences(table: dict[str, list[dict]]) -> dict[str, dict]:
    """Each later method's ensemble accuracy minus the first method's, seed for seed (runs of
    one seed share initial weights, data order and test images, so the paired difference is
    far less noisy than the two means)."""
    methods = list(table)
    reference = [row["autoattack"] for row in table[methods[0]]]
    result = {}
    for method in methods[1:]:
        differences = [row["autoattack"] - ref
                       for row, ref in zip(table[method], reference, strict=True)]
        if len(differences) < 2:
            continue
        result[method] = {
            "differences": differences,
            "mean": statistics.mean(differences),
            "standard_error": statistics.stdev(differences) / len(differences) ** 0.5,
            "seeds_ahead": sum(d > 0 for d in differences),
            "seeds_tied": sum(d == 0 for d in differences),
        }
    return result


def print_summary(table: dict[str, list[dict]]) -> None:
    """One line per method: accuracies (mean +/- std over seeds), compression, seconds/epoch."""
    width = max(15, *(len(method) for method in table))
    print(f"{'method':<{width}} {'clean':>12} {'PGD-20':>12} {'AutoAttack':>12} {'params':>7} "
          f"{'MACs':>6} {'s/epoch':>8}")
    for method, rows in table.items():
        column = {key: [row[key] for row in rows] for key in (
            "clean", "pgd20", "autoattack", "compression", "mac_reduction", "train_s_per_epoch")}
        print(f"{method:<{width}} {mean_std(column['clean']):>12} "
              f"{mean_std(column['pgd20']):>12} {mean_std(column['autoattack']):>12} "
              f"{statistics.mean(column['compression']):>6.1f}x "
              f"{statistics.mean(column['mac_reduction']):>5.1f}x "
              f"{statistics.mean(column['train_s_per_epoch']):>8.2f}")


def print_paired(paired: dict[str, dict], reference: str) -> None:
    for method, figures in paired.items():
        print(f"{method} minus {reference}, ensemble, seed for seed: "
              f"{' '.join(f'{100 * d:+.1f}' for d in figures['differences'])}; mean "
              f"{100 * figures['mean']:+.2f} +/- {100 * figures['standard_error']:.2f} (standard "
              f"error), ahead on {figures['seeds_ahead']}, tied on {figures['seeds_tied']} of "
              f"{len(figures['differences'])}")


def _relative_paths(value):
    """`value` with every absolute path inside the repository made relative to it: results
    files travel between machines, a machine's own paths do not."""
    repo = RESULTS.parents[1]
    if isinstance(value, dict):
        return {key: _relative_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_relative_paths(item) for item in value]
    if isinstance(value, str) and value.startswith(str(repo) + "/"):
        return str(Path(value).relative_to(repo))
    return value


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    # as run from benchmarks/ (how docs/results.md quotes it), wherever it was started
    script = Path(sys.argv[0])
    command = ["python", script.name if script.resolve().parent == RESULTS.parent
               else sys.argv[0], *sys.argv[1:]]
    data = {"command": " ".join(command), "torch": torch.__version__,
            **_relative_paths(data)}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"raw numbers: {path.relative_to(RESULTS.parents[1])}")  # docs/generate.py renders it
    return path
