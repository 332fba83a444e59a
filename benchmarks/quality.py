"""Quality: every method at one density on the embedded default, several seeds.

Clean, PGD-20 and AutoAttack-grade robust accuracy (mean +/- std over seeds), achieved
compression, MAC reduction and training seconds per epoch, all from the same training loop and
epoch budget; per-layer densities (final, and at every rewire) go into the JSON. With several
seeds, each method is also compared with the first seed for seed on the ensemble: runs of one
seed share the initial weights, the data order and the test images, so the paired difference
is far less noisy than the two means.

    .venv/bin/python benchmarks/quality.py --seeds 0 1 2 --epochs 20 --threads 1
"""

from __future__ import annotations

from common import (
    METHODS,
    announce,
    base_parser,
    paired_differences,
    print_paired,
    print_summary,
    row_of,
    trained_run,
    write_results,
)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--name", help="results file name (default: quality_dDENSITY)")
    args = parser.parse_args()
    announce(args)
    table = {}
    for method in args.methods:
        rows = [row_of(trained_run(args.workdir, method, args.density, seed, args.epochs),
                       args.square_queries) for seed in args.seeds]
        table[method] = rows
    print(f"\ndensity {args.density}, {args.epochs} epochs, seeds {args.seeds} (accuracy in %)")
    print_summary(table)
    paired = paired_differences(table)
    print_paired(paired, args.methods[0])
    write_results(args.name or f"quality_d{args.density:g}",
                  {"args": vars(args), "rows": table, "paired_vs_first": paired})


if __name__ == "__main__":
    main()
