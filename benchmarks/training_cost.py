"""Training cost: seconds per epoch of DNR (irregular, channel) against dense PGD-AT, the
rewiring's own overhead, and epochs spent to reach the target against prune-then-finetune;
with --widths, of the default net widened K-fold (issue 28's capacity table).

Fresh runs (never cached). The methods take turns, round after round, and each is scored by its
fastest epoch: on a shared machine an epoch is only ever slowed by the other jobs, so the
fastest one is the closest to the method's own cost, and taking turns exposes every method to
the same stretch of load. Accuracy is not this benchmark's question (the final evaluation runs
on 64 test images, the ensemble on one).

    .venv/bin/python benchmarks/training_cost.py --epochs 3 --rounds 3 --threads 1
    .venv/bin/python benchmarks/training_cost.py --epochs 3 --rounds 1 --threads 1 \
        --methods dense dnr-gradual --widths 1 2 4 --name training_cost_widths
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from common import announce, base_parser, method_settings, write_results

from dnr_deploy import CompressConfig, compress

METHODS = ("dense", "dnr-gradual", "dnr-irregular", "dnr-channel", "magnitude")


def epoch_seconds(run_dir: Path) -> tuple[list[float], list[float]]:
    """Per-epoch training seconds (rewires excluded) and rewire seconds, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train_seconds"] for row in rows], [row["rewire_seconds"] for row in rows]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(epochs=3)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every method is trained, in turns")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--widths", type=int, nargs="+", default=[1],
                        help="the default net widened K-fold (--model small:K); rows of a "
                             "width above 1 are keyed METHOD@K")
    parser.add_argument("--name", default="training_cost")
    args = parser.parse_args()
    announce(args)
    keys = [(method, width) for width in args.widths for method in args.methods]
    epochs: dict[tuple, list[float]] = {key: [] for key in keys}
    rewires: dict[tuple, list[float]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for method, width in keys:
                run_dir = Path(tmp) / f"{method}-{width}-{round_}"
                started = time.perf_counter()
                model = {} if width == 1 else {"model": f"small:{width}"}
                compress(CompressConfig(out=str(run_dir), epochs=args.epochs, eval_samples=64,
                                        robust_eval_samples=1, seed=round_, **model,
                                        **method_settings(method, args.density)))
                train, rewire = epoch_seconds(run_dir)
                epochs[method, width] += train
                rewires[method, width] += rewire
                print(f"round {round_} {_key(method, width):<16} epochs "
                      f"{[round(s, 2) for s in train]} "
                      f"({time.perf_counter() - started:.0f} s with evaluation)", flush=True)
    rows = {_key(method, width): {
        "width": width, "fastest_epoch_s": min(epochs[method, width]),
        "median_epoch_s": statistics.median(epochs[method, width]),
        "vs_dense_fastest": min(epochs[method, width]) / min(epochs["dense", width])
        if ("dense", width) in epochs else None,
        "rewire_s_per_epoch": statistics.mean(rewires[method, width]),
        "epoch_s": epochs[method, width]} for method, width in keys}
    print(f"\n{'method':<14} {'fastest epoch s':>16} {'vs dense':>9} {'median s':>9} "
          f"{'rewire s/epoch':>15}")
    for method, row in rows.items():
        versus = "-" if row["vs_dense_fastest"] is None else f"{row['vs_dense_fastest']:.3f}x"
        print(f"{method:<14} {row['fastest_epoch_s']:>16.2f} {versus:>9} "
              f"{row['median_epoch_s']:>9.2f} {row['rewire_s_per_epoch']:>15.4f}")
    e = args.epochs
    print(f"\nepochs to a model at the target density: DNR {e} (one run); magnitude "
          f"prune-then-finetune in the same budget {e // 2} dense + {e - e // 2} fine-tune; the "
          f"classic pipeline (pre-train to convergence, prune, fine-tune) {e} + fine-tune epochs")
    write_results(args.name, {"args": vars(args), "rows": rows})


def _key(method: str, width: int) -> str:
    return method if width == 1 else f"{method}@{width}"


if __name__ == "__main__":
    main()
