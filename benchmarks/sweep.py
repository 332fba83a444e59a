"""Compression sweep: clean and PGD-20 accuracy against compression for DNR and magnitude
pruning on the embedded default; one plot.

    .venv/bin/python benchmarks/sweep.py --epochs 20
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, announce, base_parser, row_of, trained_run, write_results  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.5, 0.2, 0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--methods", nargs="+", default=["dnr-irregular", "magnitude"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    announce(args)
    rows = {m: [row_of(trained_run(args.workdir, m, d, args.seed, args.epochs), None)
                for d in args.densities] for m in args.methods}
    print(f"\n{'method':<14} {'density':>8} {'params':>7} {'clean':>6} {'PGD-20':>7}")
    for method, method_rows in rows.items():
        for r in method_rows:
            print(f"{method:<14} {r['density']:>8.4f} {r['compression']:>6.1f}x "
                  f"{100 * r['clean']:>6.1f} {100 * r['pgd20']:>7.1f}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, method_rows in rows.items():
        xs = [r["compression"] for r in method_rows]
        ax.plot(xs, [100 * r["clean"] for r in method_rows], "o-", label=f"{method} clean")
        ax.plot(xs, [100 * r["pgd20"] for r in method_rows], "s--", label=f"{method} PGD-20")
    ax.set_xscale("log")
    ax.set_xlabel("compression (dense params / deployed params)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against compression (digits, eps 0.2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "sweep.png", dpi=110)
    print(f"plot: {RESULTS / 'sweep.png'}")
    write_results("sweep", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
