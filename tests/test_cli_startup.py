"""`--help` and argument errors answer before the heavy libraries load (issue 16): every
console script parses its arguments from torch-free settings modules first."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "onnx", "torchvision", "matplotlib")
STAGES = ("compress", "export", "bench", "verify", "report")


@pytest.mark.parametrize("stage", STAGES)
def test_help_and_bad_flags_import_no_heavy_library(stage):
    probe = (
        "import sys\n"
        "import dnr_deploy.cli as cli\n"
        f"for argv in (['--help'], ['--no-such-flag']):\n"
        "    try:\n"
        f"        cli.{stage}_main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), exit.code\n"
        "    else:\n"
        "        raise AssertionError('argparse did not exit')\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert "did you mean" in done.stderr or "unrecognized arguments" in done.stderr


def test_settings_are_the_same_classes_everywhere():
    """The old import paths still give the very same classes (re-exports, not copies)."""
    from dnr_deploy import vocabulary
    from dnr_deploy.attacks import AttackName
    from dnr_deploy.compress import config as compress_config
    from dnr_deploy.compress.training import CompressConfig, ConfigError, Method
    from dnr_deploy.data import DatasetName
    from dnr_deploy.export import ExportConfig
    from dnr_deploy.export import config as export_config
    from dnr_deploy.export.quantize import ReduceRange
    from dnr_deploy.runtime import verify_config
    from dnr_deploy.runtime.verify import VerifyConfig, VerifyError
    from dnr_deploy.sparsity.masks import Granularity, Init
    from dnr_deploy.sparsity.rewire import Redistribution

    assert CompressConfig is compress_config.CompressConfig
    assert ConfigError is compress_config.ConfigError
    assert ExportConfig is export_config.ExportConfig
    assert (VerifyConfig, VerifyError) == (verify_config.VerifyConfig, verify_config.VerifyError)
    assert (Granularity, Init, Redistribution, DatasetName, Method, ReduceRange, AttackName) == (
        vocabulary.Granularity, vocabulary.Init, vocabulary.Redistribution,
        vocabulary.DatasetName, vocabulary.Method, vocabulary.ReduceRange,
        vocabulary.AttackName)


def test_help_shows_a_default_of_zero():
    """A default of 0 is shown (0 == False once hid it); None and False never are."""
    from dnr_deploy.cli import build_compress_parser

    text = " ".join(build_compress_parser().format_help().split())
    assert "(default: 0)" in text  # --seed
    assert "(default: None)" not in text and "(default: False)" not in text
