"""Training cost: seconds per epoch of DNR (irregular, channel) against dense PGD-AT, the
rewiring's own overhead, and epochs spent to reach the target against prune-then-finetune.

Fresh runs (never cached), so the timings are of this machine now; run it on a quiet machine.

    .venv/bin/python benchmarks/training_cost.py --epochs 5
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import announce, base_parser, method_settings, write_results

from dnr_deploy import CompressConfig, compress


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(epochs=5)
    parser.add_argument("--density", type=float, default=0.05)
    args = parser.parse_args()
    announce(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("dense", "dnr-irregular", "dnr-gradual", "dnr-channel", "magnitude"):
            started = time.perf_counter()
            summary = compress(CompressConfig(out=str(Path(tmp) / method), epochs=args.epochs,
                                              eval_samples=360,
                                              **method_settings(method, args.density))).summary
            timing = summary["timing"]
            rows[method] = {
                "train_s_per_epoch": timing["train_seconds_per_epoch"],
                "rewire_s_per_epoch": timing["rewire_seconds_total"] / timing["epochs"],
                "wall_s": time.perf_counter() - started,
            }
    dense = rows["dense"]["train_s_per_epoch"]
    print(f"\n{'method':<14} {'train s/epoch':>14} {'vs dense':>9} {'rewire s/epoch':>15}")
    for method, row in rows.items():
        print(f"{method:<14} {row['train_s_per_epoch']:>14.2f} "
              f"{row['train_s_per_epoch'] / dense:>8.2f}x {row['rewire_s_per_epoch']:>15.4f}")
    e = args.epochs
    print(f"\nepochs to a model at the target density: DNR {e} (sparse from the first step, one "
          f"run); magnitude prune-then-finetune in the same budget {e // 2} dense + {e - e // 2} "
          f"fine-tune; the classic pipeline (pre-train to convergence, prune, fine-tune) "
          f"{e} + fine-tune epochs")
    write_results("training_cost", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
