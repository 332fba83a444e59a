"""Training cost: seconds per epoch of DNR (irregular, channel) against dense PGD-AT, the
rewiring's own overhead, and epochs spent to reach the target against prune-then-finetune.

Fresh runs (never cached). The methods take turns, round after round, and each is scored by its
fastest epoch: on a shared machine an epoch is only ever slowed by the other jobs, so the
fastest one is the closest to the method's own cost, and taking turns exposes every method to
the same stretch of load. Accuracy is not this benchmark's question (the final evaluation runs
on 64 test images, the ensemble on one).

    .venv/bin/python benchmarks/training_cost.py --epochs 3 --rounds 3 --threads 1
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
    args = parser.parse_args()
    announce(args)
    epochs: dict[str, list[float]] = {method: [] for method in METHODS}
    rewires: dict[str, list[float]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for method in METHODS:
                run_dir = Path(tmp) / f"{method}-{round_}"
                started = time.perf_counter()
                compress(CompressConfig(out=str(run_dir), epochs=args.epochs, eval_samples=64,
                                        robust_eval_samples=1, seed=round_,
                                        **method_settings(method, args.density)))
                train, rewire = epoch_seconds(run_dir)
                epochs[method] += train
                rewires[method] += rewire
                print(f"round {round_} {method:<14} epochs {[round(s, 2) for s in train]} "
                      f"({time.perf_counter() - started:.0f} s with evaluation)", flush=True)
    dense = min(epochs["dense"])
    rows = {method: {"fastest_epoch_s": min(epochs[method]),
                     "median_epoch_s": statistics.median(epochs[method]),
                     "vs_dense_fastest": min(epochs[method]) / dense,
                     "rewire_s_per_epoch": statistics.mean(rewires[method]),
                     "epoch_s": epochs[method]}
            for method in METHODS}
    print(f"\n{'method':<14} {'fastest epoch s':>16} {'vs dense':>9} {'median s':>9} "
          f"{'rewire s/epoch':>15}")
    for method, row in rows.items():
        print(f"{method:<14} {row['fastest_epoch_s']:>16.2f} {row['vs_dense_fastest']:>8.3f}x "
              f"{row['median_epoch_s']:>9.2f} {row['rewire_s_per_epoch']:>15.4f}")
    e = args.epochs
    print(f"\nepochs to a model at the target density: DNR {e} (one run); magnitude "
          f"prune-then-finetune in the same budget {e // 2} dense + {e - e // 2} fine-tune; the "
          f"classic pipeline (pre-train to convergence, prune, fine-tune) {e} + fine-tune epochs")
    write_results("training_cost", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
