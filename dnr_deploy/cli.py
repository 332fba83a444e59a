"""Console scripts: parse, build the stage config, call one library function, map errors.

Exit codes: 0 success; 1 a check ran and failed (diverged training, a failed gate);
2 bad input (flags, files, data); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from dnr_deploy.checkpoint import CheckpointError, load_checkpoint
from dnr_deploy.config import OneLineParser, RecipeError, add_dataclass_flags, fail, load_recipe

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

COMPRESS_HELP = {
    "model": "architecture",
    "dataset": "dataset (digits is embedded; the others load from --data-dir)",
    "data_dir": "local folder holding the dataset (never downloaded)",
    "granularity": "prune single weights or whole output channels",
    "method": "dnr (rewiring); static (random masks, never rewired); magnitude (dense half, "
    "global magnitude prune, fine-tune half): the baselines, in the same loop and epochs",
    "density": "fraction of weights kept, in (0, 1]; 0.05 is 20x compression",
    "dense": "no pruning: plain PGD adversarial training (the baseline)",
    "rewire_every": "optimizer steps between DNR rewires",
    "prune_rate": "fraction of active weights each layer drops at the first rewire (cosine "
    "decay to 0 at --rewire-until)",
    "rewire_until": "fraction of training after which the masks are frozen",
    "redistribution": "how the freed budget is split over layers: momentum (each layer's total "
    "|momentum|), mean (mean |momentum|, Dettmers' split), none (each regrows what it pruned)",
    "init": "initial spread of the density over layers: uniform or erk (Evci et al. 2020)",
    "beta": "weight of the clean loss; 1 - beta weighs the PGD loss",
    "epochs": "training epochs",
    "batch_size": "batch size",
    "lr": "initial SGD learning rate (cosine decay)",
    "momentum": "SGD momentum",
    "weight_decay": "L2 penalty (SGD weight decay)",
    "eps": "Linf radius in [0, 1] pixel units (default: the dataset's)",
    "pgd_steps": "PGD steps when crafting training attacks",
    "pgd_step_size": "PGD step for training attacks (default: the dataset's)",
    "eval_pgd7_step_size": "step of the final PGD-7 evaluation (the paper uses 0.01)",
    "attack_bn": "BatchNorm mode while crafting training attacks",
    "eval_samples": "test images scored after each epoch",
    "seed": "random seed (masks, init, data order, attacks)",
    "device": "where to train",
    "out": "run dir to create (default: runs/<time>-<model>-...)",
    "resume": "run dir or checkpoint to continue",
    "stop_after": "stop after this many epochs, leaving a resumable checkpoint",
}


def build_compress_parser() -> argparse.ArgumentParser:
    from dnr_deploy.data import DatasetName
    from dnr_deploy.models import list_models
    from dnr_deploy.sparsity.masks import Granularity, Init
    from dnr_deploy.sparsity.rewire import Redistribution
    from dnr_deploy.training import CompressConfig, Method

    parser = OneLineParser(
        prog="dnr-compress",
        description="Train one network that is both pruned to a target density and "
        "adversarially trained (Dynamic Network Rewiring).",
    )
    parser.add_argument("--config", help="YAML recipe; flags given here win over it")
    choices = {
        "model": list_models(),
        "dataset": [d.value for d in DatasetName],
        "granularity": [g.value for g in Granularity],
        "device": ["cpu", "cuda"],
        "attack_bn": ["eval", "train"],
        "method": [m.value for m in Method],
        "redistribution": [r.value for r in Redistribution],
        "init": [i.value for i in Init],
    }
    add_dataclass_flags(parser, CompressConfig, COMPRESS_HELP, choices)
    return parser


def compress_config_from(args: argparse.Namespace):
    """Defaults <- recipe <- flags; on --resume, the checkpoint's settings replace the defaults."""
    from dnr_deploy.training import CompressConfig, settings_from_checkpoint

    settings = dict(vars(args))
    recipe = settings.pop("config", None)
    base: dict = {}
    if settings.get("resume"):
        saved = settings_from_checkpoint(load_checkpoint(settings["resume"])["config"],
                                         f"checkpoint {settings['resume']!r}")
        base = {k: v for k, v in saved.items() if k not in ("out", "stop_after")}
    if recipe:
        base.update(load_recipe(recipe, CompressConfig))
    base.update(settings)
    return CompressConfig(**base)


def compress_main(argv: list[str] | None = None) -> int:
    from dnr_deploy.data import DataError
    from dnr_deploy.distributed import RankDisagreement
    from dnr_deploy.trainer import compress
    from dnr_deploy.training import ConfigError, TrainingDiverged, TrainingInterrupted

    prog = "dnr-compress"
    args = build_compress_parser().parse_args(argv)
    try:
        run = compress(compress_config_from(args))
    except (ConfigError, DataError, CheckpointError, RecipeError) as err:
        return fail(prog, err, EXIT_BAD_INPUT)
    except (TrainingDiverged, RankDisagreement) as err:
        return fail(prog, err, EXIT_CHECK_FAILED)
    except TrainingInterrupted as err:
        return fail(prog, err, EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # outside the epochs: setup or the final evaluation
        return fail(prog, "interrupted; a checkpoint already written is kept for --resume",
                    EXIT_INTERRUPTED)
    except OSError as err:  # e.g. --out on a read-only or full disk
        return fail(prog, f"cannot write the run dir: {err}", EXIT_BAD_INPUT)
    print_run(run)
    return EXIT_OK


def print_run(run) -> None:
    summary = run.summary
    if "accuracy" not in summary:
        print(f"stopped after epoch {summary.get('stopped_after_epoch')}; "
              f"continue with: dnr-compress --resume {run.dir}")
        return
    acc, dens, params = summary["accuracy"], summary["density"], summary["params"]
    print(f"run dir: {run.dir}")
    print(f"  {summary['granularity']}: density {dens['achieved']:.4f} (target {dens['target']:g}),"
          f" params {params['deployed']:,} / {params['dense']:,} ({params['compression']:.1f}x),"
          f" MACs {summary['macs']['reduction']:.1f}x fewer")
    print(f"  test accuracy at eps {summary['threat_model']['eps']:.4g}: clean {acc['clean']:.4f}, "
          f"FGSM {acc['fgsm']:.4f}, PGD-7 {acc['pgd7']:.4f}, PGD-20 {acc['pgd20']:.4f}")


EXPORT_HELP = {
    "out": "deploy dir to create (default: RUN_DIR/deploy)",
    "format": "onnx: model.onnx plus loadable weights (and the CSR bundle for irregular runs); "
    "csr: the CSR bundle alone (irregular runs)",
    "baseline": "also write baseline.onnx, the unpruned architecture, for side-by-side benchmarks",
    "force": "replace a non-empty --out",
    "parity_samples": "test images for the parity checks",
    "data_dir": "folder holding the run's dataset (default: the run's own --data-dir)",
    "opset": "ONNX opset",
    "parity_atol": "largest |logit difference| allowed between ONNX Runtime and PyTorch",
    "shrink_atol": "largest |logit difference| allowed between shrunk and masked network",
}


def build_export_parser() -> argparse.ArgumentParser:
    from dnr_deploy.export.deploy import ExportConfig, ExportFormat

    parser = OneLineParser(
        prog="dnr-export",
        description="Turn a finished dnr-compress run into a checked deploy dir: a physically "
        "smaller network (channel runs) or CSR weights and a sparse ONNX (irregular runs), "
        "verified against the training network in ONNX Runtime, plus manifest.json.",
    )
    parser.add_argument("run_dir", nargs="?", default=argparse.SUPPRESS, metavar="RUN_DIR",
                        help="run dir written by dnr-compress (default: the latest run)")
    parser.add_argument("--config", help="deployment profile (YAML, e.g. export/default.yaml); "
                        "flags given here win over it")
    add_dataclass_flags(parser, ExportConfig, EXPORT_HELP,
                        {"format": [f.value for f in ExportFormat]}, skip=("run_dir",))
    return parser


def export_config_from(args: argparse.Namespace):
    """Defaults <- deployment profile <- flags."""
    from dnr_deploy.export.deploy import ExportConfig

    settings = dict(vars(args))
    profile = settings.pop("config", None)
    base = load_recipe(profile, ExportConfig) if profile else {}
    base.update(settings)
    return ExportConfig(**base)


def export_main(argv: list[str] | None = None) -> int:
    from dnr_deploy.data import DataError
    from dnr_deploy.export.deploy import ExportCheckFailed, ExportError, export_run
    from dnr_deploy.export.manifest import ManifestError, format_summary

    prog = "dnr-export"
    args = build_export_parser().parse_args(argv)
    try:
        result = export_run(export_config_from(args))
    except (ExportError, CheckpointError, DataError, RecipeError, ManifestError) as err:
        return fail(prog, err, EXIT_BAD_INPUT)
    except ExportCheckFailed as err:
        return fail(prog, err, EXIT_CHECK_FAILED)
    except KeyboardInterrupt:
        return fail(prog, "interrupted; nothing was written", EXIT_INTERRUPTED)
    except OSError as err:  # e.g. --out on a read-only or full disk
        return fail(prog, f"cannot write the deploy dir: {err}", EXIT_BAD_INPUT)
    print(format_summary(result.dir, result.manifest))
    return EXIT_OK


BENCH_HELP = {
    "baseline": "another deploy dir whose model.onnx is the baseline (default: this deploy "
    "dir's baseline.onnx, written by dnr-export --baseline)",
    "provider": "ONNX Runtime execution provider (cuda needs onnxruntime-gpu)",
    "batch": "comma-separated batch sizes",
    "threads": "ONNX Runtime intra-op threads",
    "warmup": "untimed calls before timing each batch size",
    "runs": "timed calls per batch size",
    "seed": "seed of the random input images",
    "out": "folder for bench.json and the plot (default: DEPLOY_DIR/reports)",
}

VERIFY_HELP = {
    "dataset": "dataset of the test split (default: the source run's, from its run.json)",
    "data_dir": "folder holding the dataset (default: the source run's --data-dir)",
    "attack": "pgd: white-box on the re-imported ONNX graph; square: black-box, ONNX Runtime "
    "queries only (the gradient-masking cross-check)",
    "eps": "Linf radius in (0, 1] (default: the manifest's threat model)",
    "steps": "PGD steps or Square queries (default: 20 for pgd, 5000 for square)",
    "step_size": "PGD step (default: eps / 4, the run's PGD-20)",
    "p_init": "Square: initial fraction of the image one square covers",
    "n": "score the first N test images (default: the whole test split)",
    "tolerance": "percentage points the robust accuracy may fall below the training side's "
    "PGD-20 before the exit code is 1",
    "batch_size": "images per batch",
    "provider": "ONNX Runtime execution provider",
    "threads": "ONNX Runtime intra-op threads",
    "parity_atol": "largest |logit difference| allowed between the re-imported graph and "
    "ONNX Runtime, on every batch",
    "seed": "seed of the attack's randomness",
    "examples": "images in the example grid",
    "out": "folder for verify.json and the examples (default: DEPLOY_DIR/reports)",
}


def _deploy_dir_parser(prog: str, description: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("deploy_dir", nargs="?", default=argparse.SUPPRESS, metavar="DEPLOY_DIR",
                        help="deploy dir written by dnr-export (default: the latest run's)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON result instead of the table")
    return parser


def build_bench_parser() -> argparse.ArgumentParser:
    from dnr_deploy.runtime.bench import BenchConfig
    from dnr_deploy.runtime.session import Provider

    parser = _deploy_dir_parser(
        "dnr-bench", "Latency of a deploy dir's model.onnx in ONNX Runtime (p50/p90/p99, "
        "throughput) against its baseline, with speedup, MAC ratio and efficiency.")
    add_dataclass_flags(parser, BenchConfig, BENCH_HELP,
                        {"provider": [p.value for p in Provider]}, skip=("deploy_dir",))
    return parser


def bench_main(argv: list[str] | None = None) -> int:
    import json

    from dnr_deploy.export.manifest import ManifestError
    from dnr_deploy.runtime.bench import BenchConfig, BenchError, bench, format_table
    from dnr_deploy.runtime.deploydir import DeployDirError
    from dnr_deploy.runtime.session import SessionError

    prog = "dnr-bench"
    args = vars(build_bench_parser().parse_args(argv))
    as_json = args.pop("json")
    try:
        result = bench(BenchConfig(**args))
    except (BenchError, DeployDirError, ManifestError, SessionError) as err:
        return fail(prog, err, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return fail(prog, "interrupted; nothing was written", EXIT_INTERRUPTED)
    except OSError as err:
        return fail(prog, f"cannot write the report: {err}", EXIT_BAD_INPUT)
    print(json.dumps(result.report, indent=2) if as_json else
          format_table(result.report) + f"\n  report: {result.out_dir}")
    return EXIT_OK


def build_verify_parser() -> argparse.ArgumentParser:
    from dnr_deploy.data import DatasetName
    from dnr_deploy.runtime.session import Provider
    from dnr_deploy.runtime.verify import AttackName, VerifyConfig

    parser = _deploy_dir_parser(
        "dnr-verify", "Clean and robust accuracy of the deployed artifact itself, scored by "
        "ONNX Runtime, compared with the training-side figures in its manifest.")
    choices = {"attack": [a.value for a in AttackName], "provider": [p.value for p in Provider],
               "dataset": [d.value for d in DatasetName]}
    add_dataclass_flags(parser, VerifyConfig, VERIFY_HELP, choices, skip=("deploy_dir",))
    return parser


def verify_main(argv: list[str] | None = None) -> int:
    import json
    import warnings

    from dnr_deploy.data import DataError
    from dnr_deploy.export.manifest import ManifestError
    from dnr_deploy.runtime.deploydir import DeployDirError
    from dnr_deploy.runtime.onnx_torch import UnsupportedGraphError
    from dnr_deploy.runtime.session import SessionError
    from dnr_deploy.runtime.verdict import format_table
    from dnr_deploy.runtime.verify import VerifyCheckFailed, VerifyConfig, VerifyError, verify

    prog = "dnr-verify"
    args = vars(build_verify_parser().parse_args(argv))
    as_json = args.pop("json")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = verify(VerifyConfig(**args))
    except (VerifyError, DeployDirError, ManifestError, SessionError, UnsupportedGraphError,
            DataError) as err:
        return fail(prog, err, EXIT_BAD_INPUT)
    except VerifyCheckFailed as err:
        return fail(prog, err, EXIT_CHECK_FAILED)
    except KeyboardInterrupt:
        return fail(prog, "interrupted; nothing was written", EXIT_INTERRUPTED)
    except OSError as err:
        return fail(prog, f"cannot write the report: {err}", EXIT_BAD_INPUT)
    reported = set(result.warnings)  # already in the table and verify.json
    for warning in caught:
        if str(warning.message) not in reported:
            print(f"{prog}: warning: {warning.message}", file=sys.stderr)
    print(json.dumps(result.report, indent=2) if as_json else
          format_table(result.report) + f"\n  report: {result.out_dir}")
    if not result.passed:
        comp = result.report["comparison"]
        return fail(prog, f"robust accuracy of the artifact is {comp['robust_drop_points']:.2f} "
                    f"points below the training side's (tolerance {comp['tolerance_points']:g})",
                    EXIT_CHECK_FAILED)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m dnr_deploy.cli STAGE ...`: one entry point for every stage (torchrun too)."""
    argv = sys.argv[1:] if argv is None else argv
    stages = {"compress": compress_main, "export": export_main, "bench": bench_main,
              "verify": verify_main}
    if not argv or argv[0] not in stages:
        return fail("dnr-deploy", f"first argument must be a stage: {', '.join(stages)}")
    return stages[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
