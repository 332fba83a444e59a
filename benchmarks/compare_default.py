"""Dense PGD-AT vs DNR irregular vs DNR channel on the embedded default, same epochs and seed.

Prints a table (clean and PGD-20 accuracy, achieved density, MAC reduction, seconds per epoch,
rewiring overhead) and writes the raw numbers as JSON. Run on a quiet machine:

    .venv/bin/python benchmarks/compare_default.py --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dnr_deploy import CompressConfig, compress

VARIANTS = {
    "dense PGD-AT": {"dense": True},
    "DNR irregular": {"granularity": "irregular"},
    "DNR channel": {"granularity": "channel"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/compare_default.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join([sys.executable, *sys.argv]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            started = time.perf_counter()
            config = CompressConfig(epochs=args.epochs, density=args.density, seed=args.seed,
                                    out=str(Path(tmp) / name.replace(" ", "_")), **overrides)
            summary = compress(config).summary
            timing = summary["timing"]
            rows.append({
                "method": name,
                "clean": summary["accuracy"]["clean"],
                "pgd20": summary["accuracy"]["pgd20"],
                "pgd7": summary["accuracy"]["pgd7"],
                "density": summary["density"]["achieved"],
                "compression": summary["params"]["compression"],
                "mac_reduction": summary["macs"]["reduction"],
                "train_s_per_epoch": timing["train_seconds_per_epoch"],
                "rewire_s_per_epoch": timing["rewire_seconds_total"] / timing["epochs"],
                "wall_s": time.perf_counter() - started,
            })
    print(f"\n{'method':<15} {'clean':>6} {'PGD-20':>7} {'density':>8} {'params':>7} "
          f"{'MACs':>6} {'s/epoch':>8} {'rewire s':>9}")
    for r in rows:
        print(f"{r['method']:<15} {r['clean']:>6.3f} {r['pgd20']:>7.3f} {r['density']:>8.4f} "
              f"{r['compression']:>6.1f}x {r['mac_reduction']:>5.1f}x "
              f"{r['train_s_per_epoch']:>8.2f} {r['rewire_s_per_epoch']:>9.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows},
                              indent=2) + "\n")
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
