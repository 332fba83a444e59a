"""dnr-export as a user runs it: clean failures with nothing partial left, and the default run
exported end to end in both granularities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dnr_deploy import data
from dnr_deploy.cli import export_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.deploydir import manifest
from dnr_deploy.export import load_deployed_model, load_source
from dnr_deploy.export import onnx as onnx_io
from tests.factories import write_fake_run
from tests.helpers import REPO, assert_clean_failure, run_cli


def export(argv: list[str], capsys) -> tuple[int, str, str]:
    code = export_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected: int = 2) -> str:
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dnr-export: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary build folders an export would leave behind if it did not clean up."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.is_dir()]


@pytest.fixture
def fake_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    return run_dir


def test_not_a_run_dir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_one_line_error(*export([str(empty)], capsys)[::2])
    assert "not a finished run dir" in line
    line = assert_one_line_error(*export([str(tmp_path / "missing")], capsys)[::2])
    assert "does not exist" in line
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_damaged_checkpoint(fake_run, damage, capsys):
    file = fake_run / ckpt.CHECKPOINT_NAME
    content = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        file.write_bytes(b"this is not a checkpoint" * 100)
    else:  # one flipped byte inside a tensor: loads or not, the sha256 in run.json catches it
        flipped = bytearray(content)
        flipped[len(content) - 2000] ^= 0xFF
        file.write_bytes(bytes(flipped))
    line = assert_one_line_error(*export([str(fake_run)], capsys)[::2])
    assert "checkpoint" in line
    assert not (fake_run / "deploy").exists()
    assert hidden_leftovers(fake_run) == []


def test_unknown_format_from_the_shell(fake_run, tmp_path):
    result = run_cli(["export", str(fake_run), "--format", "tflite"], cwd=tmp_path)
    assert_clean_failure(result, 2)
    assert "onnx" in result.stderr and "csr" in result.stderr  # names the allowed values
    assert not (fake_run / "deploy").exists()


def test_existing_out_needs_force(fake_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert export([str(fake_run), "--out", str(out), "--parity-samples", "32"], capsys)[0] == 0
    first = manifest.load_manifest(out)["export_seconds"]
    line = assert_one_line_error(*export([str(fake_run), "--out", str(out)], capsys)[::2])
    assert "--force" in line
    assert manifest.load_manifest(out)["export_seconds"] == first

    code, stdout, _ = export([str(fake_run), "--out", str(out), "--force",
                              "--parity-samples", "32"], capsys)
    assert code == 0  # an earlier deploy dir is what --force replaces (test_hostile_trust: only)
    assert "deploy dir:" in stdout and "checks on 32 test images" in stdout
    manifest.verify_files(out, manifest.load_manifest(out))
    assert hidden_leftovers(tmp_path) == []


def test_failed_parity_gate_writes_nothing(fake_run, monkeypatch, capsys):
    real = onnx_io.run_session
    monkeypatch.setattr(onnx_io, "run_session", lambda s, x, **kw: real(s, x, **kw) + 1e-3)
    line = assert_one_line_error(*export([str(fake_run)], capsys)[::2], expected=1)
    assert "parity gate failed" in line
    assert not (fake_run / "deploy").exists()
    assert hidden_leftovers(fake_run) == []


def test_parity_gate_scales_with_the_logits(fake_run, monkeypatch, capsys):
    """A barely trained torchvision regnet gave logits of 1.1e8 whose float32 rounding alone
    differed by 52 between PyTorch and ONNX Runtime (5e-7 of their size): that must pass, and
    an error of 1e-5 of their size must not. The rtol rule on its own: the float64 side of
    the rounding term cannot see logits scaled by the patch, so it is switched off."""
    rtol_only = ["--parity-rounding-factor", "0"]
    torch_real, ort_real = onnx_io.torch_logits, onnx_io.run_session
    monkeypatch.setattr(onnx_io, "torch_logits", lambda m, x, **kw: torch_real(m, x, **kw) * 1e8)
    monkeypatch.setattr(onnx_io, "run_session", lambda s, x, **kw: ort_real(s, x, **kw) * 1e8)
    code, _, err = export([str(fake_run), "--out", str(fake_run.parent / "big"), *rtol_only],
                          capsys)
    assert code == 0, err
    monkeypatch.setattr(onnx_io, "run_session",
                        lambda s, x, **kw: ort_real(s, x, **kw) * 1e8 * (1 + 1e-5))
    line = assert_one_line_error(
        *export([str(fake_run), "--out", str(fake_run.parent / "off"), *rtol_only], capsys)[::2],
        expected=1)
    assert "parity gate failed" in line and "largest |logit|" in line


def test_a_network_whose_logits_overflow_is_not_exported(fake_run, monkeypatch, capsys):
    """A one-epoch mnasnet0_5 in channel mode gave inf activations, then NaN logits, in eval
    mode: export says so in one line (exit 1, a check that failed) and writes nothing."""
    torch_real = onnx_io.torch_logits

    def one_overflowing(model, x, **kwargs):
        logits = torch_real(model, x, **kwargs)
        logits[3, 1] = np.nan
        return logits

    monkeypatch.setattr(onnx_io, "torch_logits", one_overflowing)
    out = fake_run.parent / "nan"
    line = assert_one_line_error(*export([str(fake_run), "--out", str(out)], capsys)[::2],
                                 expected=1)
    assert "not finite (inf or NaN) on 1 of" in line and "nothing was written" in line
    assert not out.exists()


def test_csr_format_needs_an_irregular_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "channel", density=0.3)
    line = assert_one_line_error(*export([str(run_dir), "--format", "csr"], capsys)[::2])
    assert "use --format onnx" in line
    assert not (run_dir / "deploy").exists()


def test_no_run_dir_and_no_latest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(*export([], capsys)[::2])
    assert "dnr-compress" in line


def test_a_dense_network_over_the_onnx_limit_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    from dnr_deploy.export import deploy as deploy_module

    monkeypatch.setattr(deploy_module, "ONNX_WEIGHT_LIMIT_BYTES", 10_000)
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "channel", density=0.3)
    code, _, err = export([str(run_dir), "--parity-samples", "16"], capsys)
    line = assert_one_line_error(code, err)
    assert "at most 2 GiB" in line
    assert not (run_dir / "deploy").exists() and not list(run_dir.glob(".deploy*"))


@pytest.mark.parametrize("granularity", ["channel", "dense"])
def test_dense_network_runs_export_and_load(granularity, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run = write_fake_run(run_dir, granularity, density=0.3)
    code, _, err = export([str(run_dir), "--parity-samples", "64"], capsys)
    assert code == 0, err
    deploy = run_dir / "deploy"
    info = manifest.load_manifest(deploy)
    assert info["params"]["deployed"] == run["params"]["deployed"]
    assert set(info["files"]) == {"model.onnx", "weights.npz", "pruning_history.json"}
    history = json.loads((deploy / "pruning_history.json").read_text())
    assert bool(history) == (granularity == "channel")
    if granularity == "channel":
        assert info["parity"]["shrunk_vs_masked_max_abs"] <= 1e-5
        assert info["macs"]["executed"] < info["macs"]["dense"]
    x = torch.rand(16, 1, 8, 8)
    masked = onnx_io.torch_logits(load_source(run_dir).model, x)
    np.testing.assert_allclose(onnx_io.torch_logits(load_deployed_model(deploy), x), masked,
                               atol=1e-5, rtol=0)


GRANULARITIES = ("irregular", "channel")


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory) -> dict[str, Path]:
    """`dnr-compress --epochs 2 --granularity G` (the embedded default otherwise) for both
    granularities, each in its own working folder, run side by side on the two cores."""
    folders = {g: tmp_path_factory.mktemp(f"default-{g}") for g in GRANULARITIES}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    jobs = {
        g: subprocess.Popen(
            [sys.executable, "-m", "dnr_deploy.cli", "compress", "--epochs", "2",
             "--robust-eval-samples", "48", "--granularity", g], cwd=folder, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for g, folder in folders.items()
    }
    for granularity, job in jobs.items():
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, f"compress {granularity}: {err[-2000:]}"
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_default_run_end_to_end(granularity, default_runs, monkeypatch, capsys):
    """`dnr-export --baseline` with no run dir: the latest run, into RUN_DIR/deploy."""
    monkeypatch.chdir(default_runs[granularity])
    run_dir = ckpt.latest_run()
    run = ckpt.read_run_json(run_dir)
    capsys.readouterr()

    code, stdout, err = export(["--baseline"], capsys)
    assert code == 0, err
    assert "deploy dir:" in stdout
    deploy = run_dir / "deploy"
    info = manifest.load_manifest(deploy)
    manifest.verify_files(deploy, info)
    assert info["params"]["dense"] == run["params"]["dense"]
    assert info["params"] == run["params"] and info["macs"] == run["macs"]  # one counter
    assert info["accuracy"] == run["accuracy"]
    assert info["source_run"]["checkpoint_sha256"] == run["checkpoint_sha256"]
    parity = info["parity"]
    assert parity["onnx_vs_torch_max_abs"] <= 1e-4
    assert parity["argmax_agree"] == parity["n_images"] == 360  # the whole digits test split
    assert info["export_seconds"] > 0

    x, _ = data.test_subset(data.load_data("digits"), None)
    masked = onnx_io.torch_logits(load_source(run_dir).model, x)
    loaded = onnx_io.torch_logits(load_deployed_model(deploy), x)
    one = onnx_io.run_session(onnx_io.open_session(deploy / "model.onnx"), x[:1])
    np.testing.assert_allclose(one, masked[:1], atol=1e-4, rtol=0)
    files = info["files"]
    if granularity == "channel":
        assert parity["shrunk_vs_masked_max_abs"] <= 1e-5
        assert info["macs"]["executed"] < info["macs"]["dense"]
        np.testing.assert_allclose(loaded, masked, atol=1e-5, rtol=0)
        assert files["model.onnx"]["bytes"] < 0.2 * files["baseline.onnx"]["bytes"]
    else:
        np.testing.assert_array_equal(loaded, masked)
        assert info["macs"]["nonzero"] < info["macs"]["executed"] == info["macs"]["dense"]
        with np.load(deploy / "weights.csr.npz", allow_pickle=False) as npz:
            nonzeros = sum(npz[k].size for k in npz.files if k.endswith("/data"))
            row_pointers = sum(npz[k].size for k in npz.files if k.endswith("/indptr"))
        assert files["weights.csr.npz"]["bytes"] <= 8.5 * nonzeros + 4 * row_pointers
        assert files["model.onnx"]["bytes"] < 0.15 * files["baseline.onnx"]["bytes"]
