"""Console scripts: parse, build the stage config, call one library function, map errors.

Exit codes: 0 success; 1 a check ran and failed (diverged training, a failed gate);
2 bad input (flags, files, data); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from dnr_deploy.compress.checkpoint import CheckpointError
from dnr_deploy.config import (
    OneLineParser,
    RecipeError,
    add_dataclass_flags,
    config_from,
    fail,
)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130



def _safe(text: str) -> str:
    """Text for the terminal, its control characters escaped (artifacts name things)."""
    from dnr_deploy.progress import terminal_safe

    return terminal_safe(text)


def _say(line: str) -> None:
    print(_safe(line))


def _add_output_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    """--json and --quiet: CLI-only (a run records what it computed, not how it printed)."""
    # SUPPRESS: absent unless typed, so config_from never sees them as settings
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress on stderr (errors and warnings still print)")


def _output_mode(args: argparse.Namespace) -> bool:
    """Pop --json / --quiet off the parsed flags; silence progress for either. True: JSON."""
    as_json, quiet = args.__dict__.pop("json", False), args.__dict__.pop("quiet", False)
    if as_json or quiet:
        from dnr_deploy.progress import silence_progress

        silence_progress()
    return as_json


def build_compress_parser() -> argparse.ArgumentParser:
    # torch-free modules only: --help and argument errors answer before torch is imported
    from dnr_deploy.compress.config import CompressConfig
    from dnr_deploy.vocabulary import (
        ChannelShares,
        DatasetName,
        Granularity,
        Init,
        Method,
        Redistribution,
    )

    parser = OneLineParser(
        prog="dnr-compress",
        description="Train one network that is both pruned to a target density and "
        "adversarially trained (Dynamic Network Rewiring).",
    )
    parser.add_argument("--config", help="YAML recipe; flags given here win over it")
    choices = {
        "redistribution": [r.value for r in Redistribution],
        "channel_shares": [c.value for c in ChannelShares],
        "init": [i.value for i in Init],
        "dataset": [d.value for d in DatasetName],
        "granularity": [g.value for g in Granularity],
        "device": ["cpu", "cuda"],
        "attack_bn": ["eval", "train"],
        "method": [m.value for m in Method],
    }
    add_dataclass_flags(parser, CompressConfig, choices)
    _add_output_flags(parser, "print run.json's summary as JSON instead of the lines")
    return parser


def compress_config_from(args: argparse.Namespace):
    """Defaults <- recipe <- flags. On --resume, `compress` itself fills every setting left at
    its default from the checkpoint (`training.merge_resume`), as it does for library calls."""
    from dnr_deploy.compress.config import CompressConfig

    return config_from(args, CompressConfig)


def compress_main(argv: list[str] | None = None) -> int:
    args = build_compress_parser().parse_args(argv)  # before torch: --help answers at once

    from dnr_deploy.compress.distributed import RankDisagreement
    from dnr_deploy.compress.trainer import compress
    from dnr_deploy.compress.training import ConfigError, TrainingDiverged, TrainingInterrupted
    from dnr_deploy.data import DataError

    as_json = _output_mode(args)
    run = _guarded("dnr-compress", lambda: compress(compress_config_from(args)),
                   (ConfigError, DataError, CheckpointError, RecipeError),
                   (TrainingDiverged, RankDisagreement), (TrainingInterrupted,),
                   # Ctrl-C outside the epochs: setup or the final evaluation
                   "interrupted; a checkpoint already written is kept for --resume",
                   "the run dir")
    if isinstance(run, int):
        return run
    if as_json:
        import json

        print(json.dumps({"run_dir": str(run.dir), **run.summary}, indent=2))
    else:
        print_run(run)
    return EXIT_OK


def print_run(run) -> None:
    summary = run.summary
    if "accuracy" not in summary:
        _say(f"stopped after epoch {summary.get('stopped_after_epoch')}; "
             f"continue with: dnr-compress --resume {run.dir}")
        return
    acc, dens, params = summary["accuracy"], summary["density"], summary["params"]
    _say(f"run dir: {run.dir}")
    _say(f"  {summary['granularity']}: density {dens['achieved']:.4f} (target {dens['target']:g}),"
         f" params {params['deployed']:,} / {params['dense']:,} ({params['compression']:.1f}x),"
         f" MACs {summary['macs']['reduction_executed']:.1f}x fewer executed, "
         f"{summary['macs']['reduction_nonzero']:.1f}x fewer nonzero")
    _say(f"  test accuracy at eps {summary['threat_model']['eps']:.4g}: "
         f"clean {100 * acc['clean']:.2f}%, FGSM {100 * acc['fgsm']:.2f}%, "
         f"PGD-7 {100 * acc['pgd7']:.2f}%, PGD-20 {100 * acc['pgd20']:.2f}%")
    if summary.get("dense_convs"):
        dense = summary["dense_convs"]
        _say(f"  {len(dense)} conv(s) left dense (coupling not one-to-one): "
             f"{', '.join(dense[:4])}{', ... (all in run.json)' if len(dense) > 4 else ''}")
    robustness = summary["robustness"]
    _say(f"  AutoAttack-grade worst case (APGD-CE, APGD-T, Square) on the first "
         f"{robustness['images']} test images: {100 * acc['autoattack']:.2f}%")
    for warning in robustness["warnings"]:
        _say(f"  warning: {warning}")


def build_export_parser() -> argparse.ArgumentParser:
    from dnr_deploy.export.config import ExportConfig, ExportFormat
    from dnr_deploy.vocabulary import ReduceRange

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
    add_dataclass_flags(parser, ExportConfig,
                        {"format": [f.value for f in ExportFormat], "quantize": ["int8"],
                         "reduce_range": [r.value for r in ReduceRange]}, skip=("run_dir",))
    _add_output_flags(parser, "print the manifest as JSON instead of the summary")
    return parser


def export_config_from(args: argparse.Namespace):
    """Defaults <- deployment profile <- flags."""
    from dnr_deploy.export.config import ExportConfig

    return config_from(args, ExportConfig)


def export_main(argv: list[str] | None = None) -> int:
    args = build_export_parser().parse_args(argv)  # before torch: --help answers at once

    from dnr_deploy.data import DataError
    from dnr_deploy.deploydir.manifest import ManifestError, format_summary
    from dnr_deploy.export import ExportCheckFailed, ExportError, export_run

    as_json = _output_mode(args)
    result = _guarded("dnr-export", lambda: export_run(export_config_from(args)),
                      (ExportError, CheckpointError, DataError, RecipeError, ManifestError),
                      (ExportCheckFailed,), writing="the deploy dir")
    if isinstance(result, int):
        return result
    if as_json:
        import json

        print(json.dumps({"deploy_dir": str(result.dir), **result.manifest}, indent=2))
    else:
        print(_safe(format_summary(result.dir, result.manifest)))
        from dnr_deploy.deploydir.names import SIGNATURE_FILE

        if (result.dir / SIGNATURE_FILE).is_file():  # a fresh folder: signed by this export
            print(f"  signed without a verdict: {SIGNATURE_FILE} (dnr-verify --sign adds the "
                  "gate's)")
    return EXIT_OK


def _deploy_dir_parser(prog: str, description: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("deploy_dir", nargs="?", default=argparse.SUPPRESS, metavar="DEPLOY_DIR",
                        help="deploy dir written by dnr-export (default: the latest run's)")
    _add_output_flags(parser, "print the JSON result instead of the table")
    return parser


def build_bench_parser() -> argparse.ArgumentParser:
    from dnr_deploy.runtime.bench import BenchConfig
    from dnr_deploy.runtime.session import Provider

    parser = _deploy_dir_parser(
        "dnr-bench", "Latency of a deploy dir's model.onnx in ONNX Runtime (p50/p90/p99, "
        "throughput) against its baseline, with speedup, MAC ratio and efficiency.")
    from dnr_deploy.runtime.runtimes import Runtime

    add_dataclass_flags(parser, BenchConfig,
                        {"provider": [p.value for p in Provider],
                         "runtime": [r.value for r in Runtime]}, skip=("deploy_dir",))
    return parser


def bench_main(argv: list[str] | None = None) -> int:
    from dnr_deploy.deploydir.manifest import ManifestError
    from dnr_deploy.deploydir.opening import DeployDirError
    from dnr_deploy.runtime.bench import BenchConfig, BenchError, bench, format_table
    from dnr_deploy.runtime.session import SessionError

    parsed = build_bench_parser().parse_args(argv)
    as_json = _output_mode(parsed)
    args = vars(parsed)
    outcome = _noting("dnr-bench", lambda: _guarded(
        "dnr-bench", lambda: bench(BenchConfig(**args)),
        (BenchError, DeployDirError, ManifestError, SessionError), ()))
    if isinstance(outcome, int):
        return outcome
    _show(outcome, as_json, format_table)
    return EXIT_OK


def _guarded(prog: str, action, bad_input: tuple, check_failed: tuple,
             interrupted: tuple = (), on_ctrl_c: str = "interrupted; nothing was written",
             writing: str = "the report"):
    """Run one stage: its result, or the exit code of the one-line error it became (bad
    input 2, a failed check 1, Ctrl-C 130, a file system error while writing 2)."""
    try:
        return action()
    except bad_input as err:
        return fail(prog, err, EXIT_BAD_INPUT)
    except check_failed as err:
        return fail(prog, err, EXIT_CHECK_FAILED)
    except interrupted as err:
        return fail(prog, err, EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return fail(prog, on_ctrl_c, EXIT_INTERRUPTED)
    except OSError as err:  # e.g. --out on a read-only or full disk, an unreadable file
        from dnr_deploy.files import describe_os_error

        return fail(prog, describe_os_error(err, writing), EXIT_BAD_INPUT)


def _noting(prog: str, run):
    """`run()`, with each signature notice (`deploydir.SignatureNotice`: unsigned, or signed
    but not checked) printed once, one line on stderr, and only when the stage succeeded: a
    refused deploy dir gets its one error line alone."""
    import warnings

    from dnr_deploy.deploydir.signing import SignatureNotice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SignatureNotice)
        outcome = run()
    notes: list[str] = []
    for warning in caught:
        if not issubclass(warning.category, SignatureNotice):
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
        elif str(warning.message) not in notes:
            notes.append(str(warning.message))
    if not isinstance(outcome, int):
        for text in notes:
            print(f"{prog}: note: {text}", file=sys.stderr)
    return outcome


def _show(result, as_json: bool, format_table) -> None:
    import json

    print(json.dumps(result.report, indent=2) if as_json else
          _safe(format_table(result.report) + f"\n  report: {result.out_dir}"))


def build_verify_parser() -> argparse.ArgumentParser:
    from dnr_deploy.runtime.session import Provider
    from dnr_deploy.runtime.verify_config import VerifyConfig
    from dnr_deploy.vocabulary import AttackName, DatasetName

    parser = _deploy_dir_parser(
        "dnr-verify", "Clean and robust accuracy of the deployed artifact itself, scored by "
        "ONNX Runtime, compared with the training-side figures in its manifest.")
    from dnr_deploy.runtime.runtimes import Runtime

    choices = {"attack": [a.value for a in AttackName], "provider": [p.value for p in Provider],
               "dataset": [d.value for d in DatasetName], "runtime": [r.value for r in Runtime]}
    add_dataclass_flags(parser, VerifyConfig, choices, skip=("deploy_dir",))
    return parser


def verify_main(argv: list[str] | None = None) -> int:
    parsed = build_verify_parser().parse_args(argv)  # before torch: --help answers at once
    import warnings

    from dnr_deploy.data import DataError
    from dnr_deploy.deploydir.manifest import ManifestError
    from dnr_deploy.deploydir.opening import DeployDirError
    from dnr_deploy.runtime.onnx_torch import UnsupportedGraphError
    from dnr_deploy.runtime.session import SessionError
    from dnr_deploy.runtime.verdict import format_table
    from dnr_deploy.runtime.verify import VerifyCheckFailed, VerifyConfig, VerifyError, verify

    prog = "dnr-verify"
    as_json = _output_mode(parsed)
    args = vars(parsed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _guarded(
            prog, lambda: verify(VerifyConfig(**args)),
            (VerifyError, DeployDirError, ManifestError, SessionError, UnsupportedGraphError,
             DataError), (VerifyCheckFailed,))
    if isinstance(outcome, int):
        return outcome
    from dnr_deploy.deploydir.signing import SignatureNotice

    reported = set(outcome.warnings)  # already in the table and verify.json
    for warning in caught:
        notice = issubclass(warning.category, SignatureNotice)
        if notice and not outcome.passed:
            continue  # a failed gate's one error line stays alone
        if str(warning.message) not in reported:
            reported.add(str(warning.message))  # the sparse runtime's loader repeats notices
            print(_safe(f"{prog}: {'note' if notice else 'warning'}: {warning.message}"),
                  file=sys.stderr)
    _show(outcome, as_json, format_table)
    if outcome.signature is not None and not as_json:
        print(f"  signed: {outcome.signature} (the verdict in verify.json beside it, and "
              "every file)")
    if not outcome.passed:
        return fail(prog, outcome.report["comparison"]["reasons"][0], EXIT_CHECK_FAILED)
    return EXIT_OK


def build_report_parser() -> argparse.ArgumentParser:
    from dnr_deploy.report import ReportConfig

    parser = OneLineParser(
        prog="dnr-report", description="One summary of a run and its deploy dir (accuracy with "
        "the ensemble, compression, MACs, speedup, gate) as a table and an HTML page.")
    parser.add_argument("path", nargs="?", default=argparse.SUPPRESS, metavar="RUN_OR_DEPLOY_DIR",
                        help="run dir or deploy dir (default: the latest run)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON instead of the table")
    add_dataclass_flags(parser, ReportConfig, {}, skip=("path",))
    return parser


def report_main(argv: list[str] | None = None) -> int:
    from dnr_deploy.report import ReportConfig, ReportError, format_table, report, to_json

    args = vars(build_report_parser().parse_args(argv))
    as_json = args.pop("json")
    outcome = _noting("dnr-report", lambda: _guarded(
        "dnr-report", lambda: report(ReportConfig(**args)), (ReportError,), (),
        writing="the HTML page"))
    if isinstance(outcome, int):
        return outcome
    summary, page = outcome
    print(to_json(summary) if as_json else _safe(format_table(summary) + f"\n  report: {page}"))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m dnr_deploy.cli STAGE ...`: one entry point for every stage (torchrun too)."""
    argv = sys.argv[1:] if argv is None else argv
    stages = {"compress": compress_main, "export": export_main, "bench": bench_main,
              "verify": verify_main, "report": report_main}
    if not argv or argv[0] not in stages:
        return fail("dnr-deploy", f"first argument must be a stage: {', '.join(stages)}")
    return stages[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
