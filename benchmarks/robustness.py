"""Robustness: each attack alone and the AutoAttack-grade ensemble, with their seconds.

On trained runs of the embedded default (dense PGD-AT, DNR irregular and channel at density
0.05): PGD-20 (the project's old figure), APGD-CE, APGD-T, Square, the ensemble (per-image
worst case), on all 360 test images, each timed on this machine.

    .venv/bin/python benchmarks/robustness.py --seeds 0 --epochs 20 --threads 1
"""

from __future__ import annotations

import statistics
import time

import torch
from common import announce, base_parser, load_model, trained_run, write_results

from dnr_deploy.attacks import AttackName, EnsembleConfig, run_ensemble
from dnr_deploy.compress.checkpoint import read_run_json
from dnr_deploy.data import load_data
from dnr_deploy.data import test_subset as first_test_images

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "square", "autoattack")
METHODS = ("dense", "dnr-irregular", "dnr-channel")


def measure(run_dir, attacks: tuple[str, ...]) -> dict:
    summary = read_run_json(run_dir)
    model = load_model(run_dir)
    x, y = first_test_images(load_data(summary["config"]["dataset"],
                                       summary["config"]["data_dir"]), None)
    eps = summary["threat_model"]["eps"]
    row = {"run": run_dir.name, "clean": summary["accuracy"]["clean"],
           "training_side_autoattack": summary["accuracy"].get("autoattack")}
    for name in attacks:
        started = time.perf_counter()
        result = run_ensemble(model, x, y, eps, EnsembleConfig(attack=name))
        row[name] = result.robust_accuracy
        row[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
        if name == AttackName.AUTOATTACK.value:
            row["stages"] = [{"attack": s.attack, "robust_after": s.robust_after,
                              "seconds": round(s.seconds, 2)} for s in result.stages]
        print(f"  {run_dir.name}: {name} {100 * result.robust_accuracy:.2f}% "
              f"({row[f'{name}_seconds']:.1f} s)", flush=True)
    return row


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    args = parser.parse_args()
    announce(args)
    table = {method: [measure(trained_run(args.workdir, method, 0.05, seed, args.epochs),
                              tuple(args.attacks)) for seed in args.seeds]
             for method in args.methods}
    print(f"\n{args.epochs} epochs, seeds {args.seeds}, {torch.get_num_threads()} thread(s); "
          "robust accuracy in % (mean over seeds), seconds of the last seed")
    print(f"{'method':<15}{'clean':>7}" + "".join(f"{a:>12}" for a in args.attacks))
    for method, rows in table.items():
        cells = "".join(f"{100 * statistics.mean(r[a] for r in rows):>12.2f}"
                        for a in args.attacks)
        seconds = "".join(f"{rows[-1][a + '_seconds']:>11.1f}s" for a in args.attacks)
        print(f"{method:<15}{100 * statistics.mean(r['clean'] for r in rows):>7.2f}{cells}")
        print(f"{'':<22}{seconds}")
    write_results("robustness", {"args": vars(args), "rows": table})


if __name__ == "__main__":
    main()
