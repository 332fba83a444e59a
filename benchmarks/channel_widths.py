"""Allocation or rewiring? Static random channels at fixed widths, trained from scratch.

DNR channel (cost shares) ends every seed at about the same widths (32-17-20-20 units on the
`small` net at 5%), where static random channels sit at 14-10-28-31. This trains static channels
at given widths, so the gap to DNR separates what the final allocation buys from what DNR's
rewiring during training buys, and compares both seed for seed with the cached runs of
`quality.py` in the same --workdir.

    .venv/bin/python benchmarks/channel_widths.py --widths 32 17 20 20 --seeds 0 1 2 \\
        --threads 1 --workdir benchmarks/results/runs_channel_seeds
"""

from __future__ import annotations

import time
from pathlib import Path
from unittest import mock

import torch
from common import (
    announce,
    base_parser,
    method_settings,
    paired_differences,
    print_paired,
    print_summary,
    row_of,
    trained_run,
    write_results,
)

from dnr_deploy import CompressConfig, compress
from dnr_deploy.sparsity import policy


def masks_at_widths(widths: list[int]):
    """A stand-in for `random_channel_masks` that switches on `widths` random units per group
    (in the groups' order) instead of filling a parameter budget. The library has no fixed-width
    option because no user asks for one; this experiment alone does, so it patches here."""
    def masks(sizes, count_params, target, generator):
        if len(widths) != len(sizes):
            raise SystemExit(f"--widths: {len(widths)} given, the model has {len(sizes)} groups")
        result = {}
        for (name, size), width in zip(sizes.items(), widths, strict=True):
            on = torch.randperm(size, generator=generator)[:width]
            result[name] = torch.zeros(size, dtype=torch.bool)
            result[name][on] = True
        return result
    return masks


def fixed_width_run(workdir: str, widths: list[int], seed: int, epochs: int) -> Path:
    run_dir = Path(workdir) / f"static-channel-w{'-'.join(map(str, widths))}-s{seed}-e{epochs}"
    if not (run_dir / "run.json").is_file():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} is an unfinished run: remove it and start again")
        started = time.perf_counter()
        with mock.patch.object(policy, "random_channel_masks", masks_at_widths(widths)):
            compress(CompressConfig(out=str(run_dir), eval_samples=360, seed=seed,
                                    epochs=epochs, **method_settings("static-channel", 0.05)))
        print(f"  trained {run_dir.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="channel_widths")
    args = parser.parse_args()
    announce(args)
    label = f"static-channel at {'-'.join(map(str, args.widths))}"
    table = {
        "static-channel": [row_of(trained_run(args.workdir, "static-channel", 0.05, s,
                                              args.epochs), None) for s in args.seeds],
        label: [row_of(fixed_width_run(args.workdir, args.widths, s, args.epochs), None)
                for s in args.seeds],
        "dnr-channel": [row_of(trained_run(args.workdir, "dnr-channel", 0.05, s, args.epochs),
                               None) for s in args.seeds],
    }
    print(f"\n{args.epochs} epochs, seeds {args.seeds} (accuracy in %)")
    print_summary(table)
    paired = paired_differences(table)
    print_paired(paired, "static-channel")
    write_results(args.name, {"args": vars(args), "rows": table, "paired_vs_first": paired})


if __name__ == "__main__":
    main()
