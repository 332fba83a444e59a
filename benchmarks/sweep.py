"""Compression sweep: clean, PGD-20 and AutoAttack-grade accuracy against compression for DNR,
static random masks and magnitude prune-then-finetune on the embedded default; one plot.
Densities in --multi-seed run every seed, the others the first seed only. Rows that
quality.py already measured (same method, density, seed and epochs) are read from its results
files with --reuse instead of training again.

    .venv/bin/python benchmarks/sweep.py --epochs 20 --threads 1 \
        --reuse quality_d0.05 quality_d0.02 quality_d0.05_gradual quality_d0.02_gradual
"""

from __future__ import annotations

import json
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    announce,
    base_parser,
    mean_std,
    row_of,
    trained_run,
    write_results,
)
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.5, 0.2, 0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--methods", nargs="+",
                        default=["dnr-gradual", "dnr-irregular", "static", "magnitude"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--multi-seed", type=float, nargs="*", default=[0.05, 0.02])
    parser.add_argument("--reuse", nargs="*", default=[], metavar="NAME",
                        help="quality.py results files (benchmarks/results/NAME.json) whose rows "
                             "stand in for runs of the same method, density, seed and epochs")
    args = parser.parse_args()
    announce(args)
    measured = reused_rows(args.reuse)

    def row(method: str, density: float, seed: int) -> dict:
        found = measured.get((method, density, seed, args.epochs))
        return found or row_of(trained_run(args.workdir, method, density, seed, args.epochs),
                               None)

    rows = {m: {d: [row(m, d, seed)
                    for seed in (args.seeds if d in args.multi_seed else args.seeds[:1])]
                for d in args.densities} for m in args.methods}
    print("\n| method | density | compression (params) | seeds | clean | PGD-20 | "
          "AutoAttack-grade | MAC reduction (nonzero) |\n|---|---|---|---|---|---|---|---|")
    for method, by_density in rows.items():
        for density, runs in by_density.items():
            pick = lambda key, runs=runs: [r[key] for r in runs]  # noqa: E731
            print(f"| {method} | {density:g} | {statistics.mean(pick('compression')):.1f}x | "
                  f"{len(runs)} | {mean_std(pick('clean'))} | {mean_std(pick('pgd20'))} | "
                  f"**{mean_std(pick('autoattack'))}** | "
                  f"{statistics.mean(pick('mac_reduction')):.1f}x |")
    plot(rows)
    by_name = {m: {str(d): runs for d, runs in v.items()} for m, v in rows.items()}
    write_results("sweep", {"args": vars(args), "rows": by_name})


def reused_rows(names: list[str]) -> dict[tuple[str, float, int, int], dict]:
    """(method, density, seed, epochs) -> row, from quality.py's results files (a row's run
    name says its seed and epochs: "dnr-gradual-d0.05-s1-e20")."""
    found = {}
    for name in names:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        density = result["args"]["density"]
        for method, rows in result["rows"].items():
            for row in rows:
                seed, epochs = re.search(r"-s(\d+)-e(\d+)$", row["run"]).groups()
                found[(method, density, int(seed), int(epochs))] = row
    return found


def plot(rows: dict) -> None:
    """Clean and AutoAttack-grade accuracy against compression, one colour per method."""
    fig, (clean_ax, robust_ax) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for method, by_density in rows.items():
        xs = [statistics.mean(r["compression"] for r in runs) for runs in by_density.values()]
        for ax, key in ((clean_ax, "clean"), (robust_ax, "autoattack")):
            ax.plot(xs, [100 * statistics.mean(r[key] for r in runs)
                         for runs in by_density.values()], "o-", label=method)
    ticks = [2, 5, 10, 20, 50, 100]
    for ax, title in ((clean_ax, "clean"), (robust_ax, "AutoAttack-grade worst case")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t}x" for t in ticks])
        ax.set_xlabel("compression (dense params / deployed params)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{title} (digits, eps 0.2)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "sweep.png", dpi=110)
    print(f"plot: {RESULTS / 'sweep.png'}")


if __name__ == "__main__":
    main()
