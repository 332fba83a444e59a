"""Tunability: the clean / robust trade-off of DNR as beta (weight of the clean loss) moves.

    .venv/bin/python benchmarks/tunability.py --epochs 20
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, announce, base_parser, row_of, trained_run, write_results  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    announce(args)
    rows = []
    for beta in args.betas:
        # beta 0.5 is the default: reuse the quality run instead of training it again
        extra = {} if beta == 0.5 else {"beta": beta}
        run = trained_run(args.workdir, "dnr-irregular", args.density, args.seed, args.epochs,
                          **extra)
        rows.append({"beta": beta, **row_of(run, args.square_queries)})
    print(f"\n{'beta':>5} {'clean':>6} {'PGD-20':>7} {'Square':>7}")
    for r in rows:
        print(f"{r['beta']:>5} {100 * r['clean']:>6.1f} {100 * r['pgd20']:>7.1f} "
              f"{100 * r['square']:>7.1f}")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([100 * r["clean"] for r in rows], [100 * r["pgd20"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"beta {r['beta']}", (100 * r["clean"], 100 * r["pgd20"]), fontsize=8)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.set_title(f"DNR at density {args.density}: tuning beta")
    fig.tight_layout()
    fig.savefig(RESULTS / "tunability.png", dpi=110)
    print(f"plot: {RESULTS / 'tunability.png'}")
    write_results("tunability", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
