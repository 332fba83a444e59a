"""Generated code with and without two of its choices, whole networks on DNR-trained masks (the
DNR runs of VGG16 and ResNet-18 at 32x32, dnr_masks.py), timed in turns in one run:

- `no_prefetch`: the code does not prefetch the next segment's code (codegen.PREFETCH = 0);
- `split`: strided convs read polyphase planes split from their input, not the input in place
  (SparseConv.in_place off).

Prints and records each engine's p50 ms, each variant's ratio to the final engine (above 1 the
final engine is faster), the same from the sum of each step's best time over rounds taken in
turns (`step_times`: a slow spell of the shared machine then costs a round of one step, not a
whole call), every engine's largest logit difference from ONNX Runtime, and how
many strided convs read in place in the final engine (none: its `split` variant is the same
engine, a control for the noise).

    cd benchmarks; python codegen_ab.py --batches 16 64
"""

from __future__ import annotations

import argparse

import numpy as np
from ab_turns import cells_in_turns
from common import write_results

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse import load_sparse
from dnr_deploy.runtime.sparse.plan import SparseConv

VARIANTS = ("final", "no_prefetch", "split")


def engine(deploy, threads: int, variant: str):
    model = load_sparse(deploy, threads=threads)
    for layer, _ in model.layers:
        if isinstance(layer, SparseConv):
            if variant == "no_prefetch":
                layer.code_prefetch = 0
            layer.in_place = variant != "split"
    return model


def step_minima(engines: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Each engine's sum over its steps of the step's least mean ms over `rounds` rounds of 3
    calls, the engines taking turns."""
    best: dict[str, np.ndarray] = {}
    for index in range(rounds):
        for name in list(engines) if index % 2 == 0 else list(engines)[::-1]:
            ms = np.array([row["ms"] for row in engines[name].step_times(x, rounds=3)])
            best[name] = np.minimum(best[name], ms) if name in best else ms
    return {name: float(ms.sum()) for name, ms in best.items()}


def engines(deploy, threads: int) -> dict:
    return {variant: engine(deploy, threads, variant) for variant in VARIANTS}


def in_place(model) -> int:
    """Strided convs of `model` that read their input in place in some call made so far."""
    return sum(any(job["geometry"].stride > 1 for job in layer._jobs.values())
               for layer, _ in model.layers if isinstance(layer, SparseConv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--turn", type=int, default=5)
    parser.add_argument("--step-rounds", type=int, default=8)
    parser.add_argument("--name", default="codegen_ab")
    args = parser.parse_args()
    rows = {}
    for name, threads, batch, made, x, parity, p50 in cells_in_turns(args, engines):
        steps = step_minima(made, x, args.step_rounds) if threads == 1 else None
        row = {"threads": threads, "batch": batch, "p50_ms": p50,
               "over_final": {k: p50[k] / p50["final"] for k in VARIANTS[1:]},
               "steps_min_ms": steps,
               "steps_over_final": steps and {k: steps[k] / steps["final"] for k in VARIANTS[1:]},
               "max_abs_vs_ort": parity, "in_place_convs": in_place(made["final"])}
        rows[f"{name}-t{threads}-b{batch}"] = row
        print(f"{name:<9} t={threads} b={batch:<3} " + "  ".join(
            f"{k} {p50[k]:7.2f} ms" + (f" ({row['over_final'][k]:.3f}x)" if k != "final" else "")
            for k in VARIANTS) + f"  vs ORT {max(parity.values()):.1e}", flush=True)
        if steps:
            print(" " * 20 + "step minima: " + "  ".join(
                f"{k} {steps[k]:7.2f} ms" + (f" ({row['steps_over_final'][k]:.3f}x)"
                                             if k != "final" else "")
                for k in VARIANTS), flush=True)
    write_results(args.name, {"args": vars(args), "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
