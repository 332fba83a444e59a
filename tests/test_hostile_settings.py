"""Hostile settings and files (issue 25): every numeric setting finite and in its declared
range, seeds non-negative, duplicate YAML keys refused, a full disk in compress, unreadable
files worded as reads, and escape codes from artifacts never reaching the terminal raw."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from dnr_deploy import files
from dnr_deploy.attacks import EnsembleConfig
from dnr_deploy.cli import bench_main, compress_main, export_main, report_main, verify_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress.config import CompressConfig, ConfigError
from dnr_deploy.config import RecipeError, config_from, fail, field_type
from dnr_deploy.deploydir.manifest import MANIFEST_NAME, write_manifest
from dnr_deploy.export.config import ExportConfig
from dnr_deploy.progress import terminal_safe
from dnr_deploy.report import ReportConfig
from dnr_deploy.runtime.bench import BenchConfig
from dnr_deploy.runtime.verify_config import VerifyConfig, VerifyError
from tests.factories import make_deploy_dir
from tests.helpers import call

STAGES = {"compress": compress_main, "export": export_main, "bench": bench_main,
          "verify": verify_main, "report": report_main}


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one line on stderr naming what it must, no traceback. Returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# (stage, flags, what the line must say). The deploy dir / run dir named does not exist: the
# settings are refused before any file is opened.
BAD_FLAGS = [
    ("compress", ["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    ("compress", ["--lr=-inf"], "lr must be a finite number > 0"),
    ("compress", ["--density", "inf"], "density must be a finite number in (0, 1]"),
    ("compress", ["--density", "0"], "density must be a finite number in (0, 1]"),
    ("compress", ["--beta", "nan"], "beta must be a finite number in [0, 1]"),
    ("compress", ["--momentum", "1"], "momentum must be a finite number in [0, 1)"),
    ("compress", ["--weight-decay", "inf"], "weight_decay must be a finite number >= 0"),
    ("compress", ["--eps", "nan"], "eps must be a finite number in (0, 1]"),
    ("compress", ["--prune-rate", "1e999"], "prune_rate must be a finite number in (0, 1)"),
    ("compress", ["--rewire-until", "nan"], "rewire_until must be a finite number in [0, 1]"),
    ("compress", ["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    ("compress", ["--seed", "-5"], "seed must be an integer in [0, 2**63), got -5"),
    ("export", ["--int8-max-drop", "nan"], "int8_max_drop must be a finite number in [0, 100]"),
    ("export", ["--int8-max-drop", "101"], "int8_max_drop must be a finite number in [0, 100]"),
    ("export", ["--parity-atol", "inf"], "parity_atol must be a finite number > 0"),
    ("export", ["--parity-rtol=-inf"], "parity_rtol must be a finite number in [0, 1)"),
    ("export", ["--parity-rounding-factor", "nan"], "parity_rounding_factor"),
    ("export", ["--shrink-atol", "0"], "shrink_atol must be a finite number > 0"),
    ("export", ["--opset", "16"], "opset must be an integer in [17, 23], got 16"),
    ("export", ["--calibration-images", "0"], "calibration_images must be an integer >= 1"),
    ("bench", ["--runs", "0"], "runs must be an integer >= 1, got 0"),
    ("bench", ["--warmup", "-1"], "warmup must be an integer >= 0, got -1"),
    ("bench", ["--threads", "0"], "threads must be an integer >= 1, got 0"),
    ("bench", ["--seed", "-5"], "seed must be an integer in [0, 2**63), got -5"),
    ("verify", ["--tolerance", "nan"], "tolerance must be a finite number in [0, 100], got nan"),
    ("verify", ["--tolerance", "inf"], "tolerance must be a finite number in [0, 100], got inf"),
    ("verify", ["--tolerance", "-1"], "tolerance must be a finite number in [0, 100]"),
    ("verify", ["--min-robust", "nan"], "min_robust must be a finite number in [0, 100]"),
    ("verify", ["--eps", "nan"], "eps must be a finite number in (0, 1], got nan"),
    ("verify", ["--p-init", "1.5"], "p_init must be a finite number in (0, 1]"),
    ("verify", ["--parity-atol", "nan"], "parity_atol must be a finite number > 0"),
    ("verify", ["--queries", "1"], "queries must be an integer >= 2, got 1"),
    ("verify", ["--seed", "-5"], "seed must be an integer in [0, 2**63), got -5"),
    ("verify", ["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("stage", "flags", "message"), BAD_FLAGS,
                         ids=[f"{s}{' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_a_bad_setting_is_one_line_and_exit_2(stage, flags, message, tmp_path, capsys,
                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = [] if stage == "compress" else [str(tmp_path / "absent")]
    result = call(STAGES[stage], [*target, *flags], capsys)
    assert_one_line(result, f"dnr-{stage}: error: {message}")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("cls", [CompressConfig, ExportConfig, BenchConfig, VerifyConfig,
                                 ReportConfig, EnsembleConfig])
def test_every_numeric_setting_of_every_stage_declares_its_range(cls):
    for field in dataclasses.fields(cls):
        if field_type(cls, field.name) in (int, float):
            assert "bounds" in field.metadata, f"{cls.__name__}.{field.name} has no range"
            default = field.default
            assert default is None or field.metadata["bounds"].admits(default), field.name


def test_the_help_shows_each_range(capsys):
    result = call(verify_main, ["--help"], capsys)
    assert result.returncode == 0
    assert "allowed: [0, 100]" in " ".join(result.stdout.split())  # --tolerance


@pytest.mark.parametrize(("config", "validate", "error"), [
    (CompressConfig(lr=float("inf")), CompressConfig.resolved, ConfigError),
    (CompressConfig(epochs=2.5), CompressConfig.resolved, ConfigError),
    (CompressConfig(seed=True), CompressConfig.resolved, ConfigError),
    (VerifyConfig(tolerance=float("nan")), VerifyConfig.validated, VerifyError),
    (VerifyConfig(seed=-5), VerifyConfig.validated, VerifyError),
    (EnsembleConfig(square_p_init=float("nan")), EnsembleConfig.validated, ValueError),
    (EnsembleConfig(seed=-1), EnsembleConfig.validated, ValueError),
])
def test_the_python_api_meets_the_same_rule(config, validate, error):
    with pytest.raises(error, match="must be"):
        validate(config)


@pytest.mark.parametrize(("stage", "text", "needle"), [
    ("compress", "lr: .nan\n", "lr must be a finite number > 0, got nan"),
    ("compress", "seed: -3\n", "seed must be an integer in [0, 2**63)"),
    ("export", "int8_max_drop: .inf\n", "int8_max_drop must be a finite number in [0, 100]"),
])
def test_a_recipe_meets_the_same_rule(stage, text, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(text)
    target = [] if stage == "compress" else ["absent"]
    assert_one_line(call(STAGES[stage], [*target, "--config", "recipe.yaml"], capsys), needle)


@pytest.mark.parametrize(("stage", "text", "needle"), [
    ("compress", "epochs: 2\nlr: 0.1\nlr: 10\n", "'lr' is written twice (lines 2 and 3)"),
    ("compress", "batch-size: 32\nbatch_size: 64\n", "'batch_size' is written twice"),
    ("export", "opset: 18\nparity_samples: 64\nopset: 17\n", "'opset' is written twice"),
])
def test_a_duplicate_yaml_key_is_refused(stage, text, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(text)
    target = [] if stage == "compress" else ["absent"]
    line = assert_one_line(call(STAGES[stage], [*target, "--config", "recipe.yaml"], capsys),
                           needle, "recipe.yaml")
    assert line.startswith(f"dnr-{stage}: error: recipe ")


def test_a_duplicate_key_inside_a_nested_mapping_is_refused_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: {a: 1, a: 2}\n")
    with pytest.raises(RecipeError, match="'a' is written twice"):
        config_from(argparse.Namespace(config=str(recipe)), CompressConfig)


# -- numbers read from a manifest that feed verify's gate -------------------------------------

@pytest.mark.parametrize("figure", ["NaN", "Infinity", "-Infinity", "1e999", "-0.5", "7"])
def test_a_manifest_figure_must_be_a_finite_fraction(figure, tmp_path, capsys):
    deploy = make_deploy_dir(tmp_path / "deploy", robust=0.5)
    manifest = (deploy / MANIFEST_NAME).read_text()
    (deploy / MANIFEST_NAME).write_text(manifest.replace('"autoattack": 0.5',
                                                         f'"autoattack": {figure}'))
    result = call(verify_main, [str(deploy), "--attack", "pgd", "--n", "8"], capsys)
    assert_one_line(result, "is damaged: 'accuracy'")
    assert not (deploy / "reports").exists()


def test_a_non_finite_manifest_eps_is_refused(tmp_path, capsys):
    deploy = make_deploy_dir(tmp_path / "deploy")
    manifest = json.loads((deploy / MANIFEST_NAME).read_text())
    manifest["threat_model"]["eps"] = float("nan")
    (deploy / MANIFEST_NAME).write_text(json.dumps(manifest))  # json writes NaN
    result = call(verify_main, [str(deploy), "--attack", "pgd", "--n", "8"], capsys)
    assert_one_line(result, "'threat_model'")


# -- escape codes from artifacts ---------------------------------------------------------------

HOSTILE = "channel\x1b[2J\x1b]0;owned\x07\u202eevil\r"


def test_terminal_safe_escapes_control_characters_but_keeps_lines():
    assert terminal_safe("a\x1b[31mb\nc\td") == "a\\x1b[31mb\nc\td"
    assert terminal_safe("\u202e\x9b\r") == "\\u202e\\x9b\\r"
    assert terminal_safe("dnr — ok 5%") == "dnr — ok 5%"


def test_an_escape_code_in_a_manifest_string_is_not_printed_raw(tmp_path, capsys):
    deploy = make_deploy_dir(tmp_path / "deploy")
    manifest = json.loads((deploy / MANIFEST_NAME).read_text())
    manifest["granularity"] = HOSTILE
    write_manifest(deploy, {k: v for k, v in manifest.items() if k != "files"})
    result = call(bench_main, [str(deploy), "--runs", "1", "--warmup", "0", "--batch", "1"],
                  capsys)
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    assert "\\x1b[2J" in shown  # the table names it, escaped
    assert not any(char in shown for char in "\x1b\x07\u202e\r")


def test_an_error_line_escapes_what_it_quotes(capsys):
    assert fail("dnr-verify", f"unknown thing {HOSTILE}") == 2
    err = capsys.readouterr().err
    assert "\\x1b[2J" in err and not any(char in err for char in "\x1b\x07\u202e\r")


# -- unreadable files ---------------------------------------------------------------------------

def test_an_unreadable_file_is_worded_as_a_read(tmp_path, capsys, monkeypatch):
    deploy = make_deploy_dir(tmp_path / "deploy")
    model = deploy / "model.onnx"
    model.chmod(0)
    if os.geteuid() == 0:  # root reads a mode-000 file: deny it as the kernel would a user
        def guarded_open(path, *args, **kwargs):
            if Path(path) == model:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return builtins.open(path, *args, **kwargs)
        monkeypatch.setattr(files, "open", guarded_open, raising=False)
    try:
        result = call(bench_main, [str(deploy), "--runs", "1", "--warmup", "0"], capsys)
    finally:
        model.chmod(0o644)
    line = assert_one_line(result, "cannot read", "model.onnx", "Permission denied")
    assert "cannot write" not in line


def test_a_write_error_is_still_worded_as_a_write():
    err = OSError(errno.ENOSPC, "No space left on device", "/nonexistent/.tmp")
    assert files.describe_os_error(err, "the report").startswith("cannot write the report")


# -- a full disk during compress ---------------------------------------------------------------

TINY_RUN = ["--out", "run", "--epochs", "2", "--eval-samples", "20", "--robust-eval-samples",
            "10", "--pgd-steps", "1", "--batch-size", "256", "--quiet"]


def _fill_disk_at(monkeypatch, failing_call: int, error: Exception) -> None:
    """torch.save fails at its `failing_call`-th call (1: the epoch-0 checkpoint), after
    writing a few bytes, as a disk filling up mid-write does."""
    import torch

    real_save, calls = torch.save, []

    def save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == failing_call:
            Path(target).write_bytes(b"PK\x03\x04partial")
            raise error
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_at_the_first_checkpoint_leaves_latest_alone(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("LATEST").write_text("previous\n")
    # torch.save's own report of a full disk: a RuntimeError from its zip writer
    _fill_disk_at(monkeypatch, 1, RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
    line = assert_one_line(call(compress_main, TINY_RUN, capsys), "cannot write checkpoint",
                           "no checkpoint was kept")
    assert "disk full" in line
    assert Path("LATEST").read_text() == "previous\n"
    assert not list(Path("run").iterdir())  # no checkpoint, no temp file


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fill_disk_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    line = assert_one_line(call(compress_main, TINY_RUN, capsys), "No space left on device",
                           "the checkpoint of epoch 0 is kept", "--resume run")
    assert "Traceback" not in line
    assert ckpt.load_checkpoint("run")["epoch"] == 0
    assert Path("LATEST").read_text() == "run\n"  # a run with a complete checkpoint
    assert not list(Path("run").glob(".*.tmp"))


@pytest.mark.slow
def test_a_full_disk_at_run_json_is_finished_by_a_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_write_json = ckpt.write_json

    def write_json(path: Path, data) -> None:
        if path.name == ckpt.RUN_JSON:
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
        real_write_json(path, data)

    monkeypatch.setattr(ckpt, "write_json", write_json)
    one_epoch = [*TINY_RUN[:2], "--epochs", "1", *TINY_RUN[4:]]
    assert_one_line(call(compress_main, one_epoch, capsys), "No space left on device",
                    "the checkpoint of epoch 1 is kept")
    assert not Path("run", ckpt.RUN_JSON).exists()
    monkeypatch.setattr(ckpt, "write_json", real_write_json)  # space freed
    result = call(compress_main, ["--resume", "run", "--quiet"], capsys)
    assert result.returncode == 0, result.stderr
    assert ckpt.read_run_json(Path("run"))["timing"]["epochs"] == 1


def test_a_checkpoint_recording_a_non_finite_setting_is_refused_on_resume(tmp_path, capsys,
                                                                          monkeypatch):
    from tests.factories import write_fake_run

    monkeypatch.chdir(tmp_path)
    write_fake_run(Path("run"))
    state = ckpt.load_checkpoint("run")
    state["config"]["lr"] = float("nan")
    ckpt.save_checkpoint(Path("run"), {k: v for k, v in state.items() if k != "format"})
    assert_one_line(call(compress_main, ["--resume", "run", "--epochs", "2"], capsys),
                    "is damaged: its lr must be a finite number > 0, got nan")
