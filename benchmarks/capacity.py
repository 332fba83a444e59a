"""Capacity by compression: how much AutoAttack-grade robustness DNR gives up at each
compression, for the default net at several widths (`small:K`), against dense PGD-AT of the
same width, with static and magnitude pruning beside DNR at --multi-seed densities; optionally
TRADES (--trades) at those densities. Independent runs train in --jobs processes (one thread
each); every run is cached under --workdir by its settings, so a rerun only adds what is new.

    .venv/bin/python benchmarks/capacity.py --widths 1 2 --jobs 2
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    announce,
    base_parser,
    row_of,
    run_name,
    trained_run,
    write_results,
)

Job = tuple[str, str, float, int, int, dict]  # workdir, method, density, seed, epochs, extra


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.5, 0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--methods", nargs="+", default=["dnr-gradual", "static", "magnitude"],
                        help="pruning methods (benchmarks/common.py METHODS); dense is always run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--multi-seed", type=float, nargs="*", default=[0.05],
                        help="densities run at every seed, and the only ones the baselines run at")
    parser.add_argument("--trades", action="store_true",
                        help="also every method (and dense) with --loss trades at the "
                             "--multi-seed densities")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write the table of the runs already cached")
    parser.add_argument("--no-dense", action="store_true",
                        help="leave the dense runs to another process (and out of the table)")
    parser.add_argument("--reverse", action="store_true",
                        help="train the runs widest first (a second process beside a forward "
                             "one shares the cache: each run is trained once, under a lock)")
    parser.set_defaults(workdir=str(RESULTS / "runs_capacity"), threads=1)
    args = parser.parse_args()
    announce(args)
    jobs = plan(args)
    print(f"{len(jobs)} runs (cached ones are read back)", flush=True)
    pending = list(range(len(jobs)))[::-1 if args.reverse else 1]
    rows: list = [None] * len(jobs)
    if args.cached_only:
        rows = [cached_row(job) for job in jobs]
        pending = []
    while pending:  # a run another process is training is skipped, and tried again after
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for index, row in zip(pending, pool.map(train_and_score, [jobs[i] for i in pending]),
                                  strict=True):
                rows[index] = row
        pending = [index for index in pending if rows[index] is None]
        if pending:
            time.sleep(30)
    jobs, rows = [j for j, r in zip(jobs, rows, strict=True) if r is not None], \
        [r for r in rows if r is not None]
    if args.no_dense:  # a helper process: the full run writes the table from the cache
        print("trained; run without --no-dense to write capacity.json", flush=True)
        return
    table = tabulate(jobs, rows)
    print_table(table, args.multi_seed)
    plot(table)
    write_results("capacity", {"args": vars(args), "rows": table})


def spec(width: int) -> dict:
    """The run settings that select width K (none for the default net: its cache names hold)."""
    return {} if width == 1 else {"model": f"small:{width}"}


def plan(args) -> list[Job]:
    """Every run the table needs, widest last (a failure shows before the long runs). With
    --trades every method, dense included, also trains with TRADES at the --multi-seed
    densities, so each TRADES row has a baseline of the same loss."""
    losses = [{}, {"loss": "trades"}] if args.trades else [{}]
    jobs: list[Job] = []
    for width in args.widths:
        for loss in [] if args.no_dense else losses:
            jobs += [(args.workdir, "dense", 1.0, seed, args.epochs, {**spec(width), **loss})
                     for seed in args.seeds]
        for density in args.densities:
            multi = density in args.multi_seed
            seeds = args.seeds if multi else args.seeds[:1]
            methods = args.methods if multi else args.methods[:1]
            for method in methods:
                for loss in losses if multi else [{}]:
                    jobs += [(args.workdir, method, density, s, args.epochs,
                              {**spec(width), **loss}) for s in seeds]
    return jobs


def train_and_score(job: Job) -> dict | None:
    """One run's row (a worker process: one thread, so two jobs share the two cores), or None
    while another process trains it."""
    torch.set_num_threads(1)
    workdir, method, density, seed, epochs, extra = job
    run = trained_run(workdir, method, density, seed, epochs, wait=False, **extra)
    return None if run is None else row_of(run, None)


def cached_row(job: Job) -> dict | None:
    """A finished run's row from the cache, or None (nothing is trained)."""
    workdir, method, density, seed, epochs, extra = job
    name = run_name(method, density, seed, epochs, extra)
    run = Path(workdir) / name
    return row_of(run, None) if (run / "run.json").is_file() else None


def tabulate(jobs: list[Job], rows: list[dict]) -> dict:
    """width -> method label -> density -> rows (one per seed)."""
    table: dict = {}
    for (_, method, density, _, _, extra), row in zip(jobs, rows, strict=True):
        width = int(extra.get("model", "small:1").split(":")[1])
        label = method if extra.get("loss") != "trades" else f"{method}+trades"
        table.setdefault(str(width), {}).setdefault(label, {}).setdefault(
            f"{density:g}", []).append(row)
    return table


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(row[key] for row in rows)


def same_loss_dense(methods: dict, method: str) -> list[dict]:
    """The dense rows a method is measured against: dense trained with the same loss, where
    the table has it (a TRADES row against dense TRADES), else dense PGD-AT."""
    trades = methods.get("dense+trades", {}).get("1")
    return trades if method.endswith("+trades") and trades else methods["dense"]["1"]


def print_table(table: dict, multi_seed: list[float]) -> None:
    print("\n| width | params (dense) | s/epoch (dense) | method | density | compression | "
          "seeds | clean | PGD-20 | AutoAttack-grade | vs dense, same loss (AA points) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for width, methods in table.items():
        dense = methods["dense"]["1"]
        params = f"{dense[0]['params_dense']:,}"
        for method, by_density in methods.items():
            for density, rows in by_density.items():
                aa = [row["autoattack"] for row in rows]
                dense_aa = mean(same_loss_dense(methods, method), "autoattack")
                spread = f" +/- {100 * statistics.stdev(aa):.1f}" if len(aa) > 1 else ""
                print(f"| {width} | {params} | {mean(dense, 'train_s_per_epoch'):.1f} | "
                      f"{method} | {density} | {mean(rows, 'compression'):.1f}x | {len(rows)} | "
                      f"{100 * mean(rows, 'clean'):.1f} | {100 * mean(rows, 'pgd20'):.1f} | "
                      f"**{100 * statistics.mean(aa):.1f}{spread}** | "
                      f"{100 * (statistics.mean(aa) - dense_aa):+.1f} |")


# marker by pruning method, filled for the hybrid loss and hollow for TRADES; colour by width
MARKERS = {"dnr-gradual": "o", "static": "s", "magnitude": "^"}


def plot(table: dict) -> None:
    """AutoAttack-grade points lost against dense PGD-AT of the same width, by compression."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for index, (width, methods) in enumerate(table.items()):
        colour = f"C{index}"
        for method, by_density in methods.items():
            if method.startswith("dense"):
                continue
            dense_aa = mean(same_loss_dense(methods, method), "autoattack")
            points = sorted((mean(rows, "compression"), 100 * (mean(rows, "autoattack")
                                                                - dense_aa))
                            for rows in by_density.values())
            trades = method.endswith("+trades")
            ax.plot(*zip(*points, strict=True), marker=MARKERS[method.split("+")[0]],
                    ls="-" if len(points) > 1 else "none", color=colour,
                    markerfacecolor="none" if trades else colour,
                    label=f"width {width}, {method}")
    ax.axhline(-1.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks([2, 5, 10, 20, 50], ["2x", "5x", "10x", "20x", "50x"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("compression (dense params / deployed params)")
    ax.set_ylabel("AutoAttack-grade accuracy minus dense (points)")
    ax.set_title("robustness lost to compression, by width (digits, eps 0.2)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="lower left")
    fig.tight_layout()
    out = RESULTS / "capacity.png"
    fig.savefig(out, dpi=110)
    print(f"plot: {Path(out).relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
