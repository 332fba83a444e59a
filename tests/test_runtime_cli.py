"""dnr-bench and dnr-verify: reports on a deploy dir, the robustness gate, the sanity warnings,
and bad input refused with one line and exit code 2 (tampered, truncated or random-bytes ONNX,
a manifest that does not match, an unknown provider, eps outside (0, 1])."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dnr_deploy.cli import bench_main, verify_main
from dnr_deploy.deploydir.manifest import ManifestError, write_manifest
from dnr_deploy.deploydir.opening import open_deploy_dir
from dnr_deploy.runtime import onnx_torch
from dnr_deploy.runtime.verify import VerifyConfig, verify
from tests.factories import make_deploy_dir
from tests.helpers import assert_clean_failure, call, run_cli


@pytest.fixture
def deploy(tmp_path) -> Path:
    return make_deploy_dir(tmp_path / "deploy")


FAST_BENCH = ["--runs", "3", "--warmup", "1"]
FAST_VERIFY = ["--n", "24", "--steps", "3", "--queries", "20", "--targets", "2"]


def test_bench_writes_report_plot_and_leaves_the_artifacts_alone(deploy, capsys):
    result = call(bench_main, [str(deploy), *FAST_BENCH, "--batch", "1,5", "--json"], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads((deploy / "reports" / "bench.json").read_text())
    assert (deploy / "reports" / "bench_latency.png").stat().st_size > 1000
    assert set(report["models"]) == {"model", "baseline"}
    assert set(report["models"]["model"]["latency"]) == {"1", "5"}
    stats = report["models"]["model"]["latency"]["5"]
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]  # ordering, not speed
    row = report["comparison"]["per_batch"]["1"]
    assert report["comparison"]["mac_ratio"] == 2.0
    assert row["efficiency"] == pytest.approx(row["speedup"] / 2.0)
    session = report["session"]
    assert session["providers"] == ["CPUExecutionProvider"]
    assert session["intra_op_num_threads"] == 1
    assert report["machine"]["versions"]["onnxruntime"] == onnxruntime.__version__
    open_deploy_dir(deploy)  # every listed file still matches its sha256

    table = call(bench_main, [str(deploy), *FAST_BENCH, "--out", str(deploy.parent / "b")],
                 capsys)
    assert table.returncode == 0 and "p50 ms" in table.stdout and "efficiency" in table.stdout


def test_bench_against_another_deploy_dir(deploy, tmp_path, capsys):
    other = make_deploy_dir(tmp_path / "dense")
    (deploy / "reports").mkdir()
    result = call(bench_main, [str(deploy), "--baseline", str(other), *FAST_BENCH, "--json"],
                  capsys)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"]["baseline"]["path"] == str(
        (other / "model.onnx").resolve())


def test_verify_report_examples_and_gate(tmp_path, capsys):
    passing = make_deploy_dir(tmp_path / "pass", robust=0.0)
    result = call(verify_main, [str(passing), *FAST_VERIFY, "--json"], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == {"dataset": "digits", "dataset_from": "source run.json",
                                "split": "test", "first": 24, "of": 360, "subset": True}
    assert report["attack"]["name"] == "autoattack" and report["attack"]["apgd_steps"] == 3
    assert [s["attack"] for s in report["stages"]] == ["apgd-ce", "apgd-t", "square"]
    assert report["attack"]["square_queries"] == 20 and report["attack"]["target_classes"] == 2
    assert report["threat_model"] == {"norm": "Linf", "eps": 0.2, "from": "manifest"}
    checks = report["checks"]
    assert checks["max_perturbation"] <= 0.2 + 1e-6 and checks["in_eps_ball"]
    assert 0.0 <= checks["pixel_min"] <= checks["pixel_max"] <= 1.0 and checks["in_pixel_range"]
    assert report["fidelity"]["clean_max_abs"] <= 1e-4
    assert report["fidelity"]["adversarial_max_abs"] <= 1e-4
    assert report["accuracy"]["robust"] == report["stages"][-1]["robust_after"]
    assert report["comparison"]["gated"] and report["comparison"]["passed"]
    assert any("sampling noise" in note for note in report["comparison"]["notes"])
    assert any("settings differ" in note for note in report["comparison"]["notes"])
    assert (passing / "reports" / "verify_examples.png").stat().st_size > 1000
    assert json.loads((passing / "reports" / "verify.json").read_text()) == report

    failing = make_deploy_dir(tmp_path / "fail", robust=0.9)  # training side claims 90%
    result = call(verify_main, [str(failing), *FAST_VERIFY], capsys)
    assert_clean_failure(result, 1)
    assert "points below" in result.stderr and "FAIL" in result.stdout
    other_eps = call(verify_main, [str(failing), *FAST_VERIFY, "--eps", "0.1"], capsys)
    assert_clean_failure(other_eps, 1)  # not comparable is not a pass
    assert "not comparable" in other_eps.stderr
    ungated = call(verify_main, [str(failing), *FAST_VERIFY, "--eps", "0.1", "--no-gate"],
                   capsys)
    assert ungated.returncode == 0, ungated.stderr


def test_verify_without_a_robust_claim_or_below_the_floor_fails(tmp_path, capsys):
    unclaimed = make_deploy_dir(tmp_path / "old", robust=None)
    result = call(verify_main, [str(unclaimed), *FAST_VERIFY], capsys)
    assert_clean_failure(result, 1)
    assert "no AutoAttack-grade training-side figure" in result.stderr
    assert call(verify_main, [str(unclaimed), *FAST_VERIFY, "--no-gate"], capsys).returncode == 0
    floor = call(verify_main, [str(unclaimed), *FAST_VERIFY, "--no-gate", "--min-robust", "50"],
                 capsys)
    assert_clean_failure(floor, 1)  # a random 10-class graph is not 50% robust
    assert "below the floor --min-robust 50%" in floor.stderr


def test_verify_pgd_is_still_selectable(deploy, capsys):
    result = call(verify_main, [str(deploy), "--attack", "pgd", "--n", "16", "--steps", "4",
                                "--json"], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["attack"]["members"] == ["pgd"] and report["attack"]["pgd_steps"] == 4


def test_verify_square_queries_ort_only(deploy, capsys, monkeypatch):
    def no_torch(*args, **kwargs):
        raise AssertionError("square must not build the PyTorch re-import")

    monkeypatch.setattr("dnr_deploy.runtime.verify.load_onnx_torch", no_torch)
    result = call(verify_main, [str(deploy), "--attack", "square", "--n", "16", "--queries", "30",
                                "--json"], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["attack"]["name"] == "square" and report["attack"]["square_queries"] == 30
    assert report["fidelity"] == {}  # nothing was re-imported
    assert report["accuracy"]["robust"] <= report["accuracy"]["clean"]


def test_verify_stops_when_the_reimport_drifts_from_ort(deploy, capsys, monkeypatch):
    forward = onnx_torch.OnnxTorch.forward
    monkeypatch.setattr(onnx_torch.OnnxTorch, "forward",
                        lambda self, x: forward(self, x) + 1e-3)
    result = call(verify_main, [str(deploy), *FAST_VERIFY], capsys)
    assert_clean_failure(result, 1)
    assert "differs from ONNX Runtime" in result.stderr


def test_verify_warns_on_probabilities_and_zero_gradients(tmp_path):
    soft = make_deploy_dir(tmp_path / "soft", softmax=True)
    with pytest.warns(RuntimeWarning, match="probabilities"):
        result = verify(VerifyConfig(deploy_dir=str(soft), n=8, steps=2, queries=20))
    assert any("probabilities" in w for w in result.report["warnings"])
    flat = make_deploy_dir(tmp_path / "flat", zero=True)
    with pytest.warns(RuntimeWarning, match="all-zero input gradient"):
        verify(VerifyConfig(deploy_dir=str(flat), n=8, steps=2, queries=20))


def rewrite(deploy: Path, name: str, content: bytes, update_manifest: bool) -> None:
    manifest = json.loads((deploy / "manifest.json").read_text())
    (deploy / name).write_bytes(content)
    if update_manifest:  # the manifest agrees: only the loader can notice
        manifest.pop("files")
        write_manifest(deploy, manifest)


def test_tampered_file_is_refused_before_loading(deploy, capsys):
    content = bytearray((deploy / "baseline.onnx").read_bytes())
    content[len(content) // 2] ^= 0xFF
    rewrite(deploy, "baseline.onnx", bytes(content), update_manifest=False)
    with pytest.raises(ManifestError, match="sha256"):
        open_deploy_dir(deploy)
    for main in (bench_main, verify_main):
        result = call(main, [str(deploy)], capsys)
        assert_clean_failure(result, 2)
        assert "sha256" in result.stderr and "baseline.onnx" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_unloadable_onnx_with_a_matching_manifest(deploy, capsys, damage):
    content = (deploy / "model.onnx").read_bytes()
    bad = content[: len(content) // 3] if damage == "truncated" else \
        np.random.default_rng(0).bytes(4096)
    rewrite(deploy, "model.onnx", bad, update_manifest=True)
    for main in (bench_main, verify_main):
        result = call(main, [str(deploy), *FAST_BENCH] if main is bench_main else
                      [str(deploy), *FAST_VERIFY], capsys)
        assert_clean_failure(result, 2)
        assert "model.onnx" in result.stderr


@pytest.mark.parametrize("args", [
    ["--provider", "tpu"], ["--batch", "1,x"], ["--batch", "0"], ["--runs", "0"],
    ["--threads", "0"]])
def test_bench_bad_flags(deploy, capsys, args):
    assert_clean_failure(call(bench_main, [str(deploy), *args], capsys), 2)


@pytest.mark.parametrize("args", [
    ["--eps", "0"], ["--eps", "1.5"], ["--eps", "-0.1"], ["--attack", "cw"], ["--n", "0"],
    ["--dataset", "cifar10"], ["--provider", "tpu"]])
def test_verify_bad_flags(deploy, capsys, args):
    assert_clean_failure(call(verify_main, [str(deploy), *args], capsys), 2)


def test_manifest_eps_outside_range_and_unknown_dataset(tmp_path, capsys):
    wide = make_deploy_dir(tmp_path / "wide", eps=2.0)
    result = call(verify_main, [str(wide), *FAST_VERIFY], capsys)
    assert_clean_failure(result, 2)
    assert "(0, 1]" in result.stderr
    lost = make_deploy_dir(tmp_path / "lost")
    shutil.rmtree(tmp_path / "lost_run")
    result = call(verify_main, [str(lost), *FAST_VERIFY], capsys)
    assert_clean_failure(result, 2)
    assert "--dataset" in result.stderr
    assert call(verify_main, [str(lost), *FAST_VERIFY, "--dataset", "digits"],
                capsys).returncode == 0


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="a GPU build of onnxruntime is installed")
def test_cuda_without_onnxruntime_gpu_says_so(deploy, capsys):
    result = call(bench_main, [str(deploy), "--provider", "cuda"], capsys)
    assert_clean_failure(result, 2)
    assert "onnxruntime-gpu" in result.stderr


def test_not_a_deploy_dir(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)  # no runs/LATEST here
    for main in (bench_main, verify_main):
        for args in ([str(tmp_path / "empty")], [str(tmp_path / "missing")], []):
            result = call(main, args, capsys)
            assert_clean_failure(result, 2)
        assert "dnr-compress" in result.stderr


def test_bad_input_as_a_user_runs_it(tmp_path):
    """Through `python -m dnr_deploy.cli` in a fresh process: no traceback anywhere."""
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_cli(["bench", "empty"], cwd=tmp_path), 2)
    assert_clean_failure(run_cli(["verify", "empty", "--eps", "2"], cwd=tmp_path), 2)


@pytest.mark.slow
@pytest.mark.ci
def test_compress_export_bench_verify_end_to_end(tmp_path):
    """The four console scripts in a row on the embedded default, as a user runs them."""
    steps = [["compress", "--epochs", "1", "--eval-samples", "50", "--robust-eval-samples", "120",
              "--out", "run"],
             ["export", "run", "--baseline", "--parity-samples", "64"],
             ["bench", "run/deploy", *FAST_BENCH],
             ["verify", "--tolerance", "5"],  # no path: the latest run's deploy dir
             ["report"]]  # the latest run, its deploy dir and both reports in one summary
    for args in steps:
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
    summary = result.stdout  # dnr-report's table, read back from the files above
    # --runtime auto: the sparse engine times an irregular deploy dir
    assert "dnr-bench (sparse" in summary and "dnr-verify (autoattack" in summary
    assert "gate" in summary and "PASS" in summary
    assert (tmp_path / "run" / "report.html").read_text().count("data:image/png;base64,") == 4
    report = json.loads((tmp_path / "run" / "deploy" / "reports" / "verify.json").read_text())
    manifest = json.loads((tmp_path / "run" / "deploy" / "manifest.json").read_text())
    assert report["images"]["first"] == 120  # the images the training side attacked
    # same images, ONNX Runtime's argmax as the training network's (a tie may flip one)
    assert report["accuracy"]["clean"] == pytest.approx(manifest["robustness"]["clean"],
                                                        abs=1.01 / 120)
    assert report["model_sha256"] == manifest["files"]["model.onnx"]["sha256"]
    # the gate's comparison: the same ensemble on the same images, through ONNX Runtime
    assert report["comparison"]["gated"] and report["comparison"]["passed"]
    assert report["accuracy"]["robust"] == pytest.approx(manifest["accuracy"]["autoattack"],
                                                         abs=2.01 / 120)
    # the deploy dir alone, moved away from its run (deleted): it still verifies
    moved = Path(shutil.move(tmp_path / "run" / "deploy", tmp_path / "elsewhere"))
    shutil.rmtree(tmp_path / "run")
    alone = run_cli(["verify", str(moved), "--n", "40", "--no-gate", "--json"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["images"]["dataset_from"] == "manifest"


def test_flag_typos_get_a_suggestion_and_bad_batch_lists_are_refused(deploy, capsys):
    typo = call(bench_main, [str(deploy), "--treads", "1"], capsys)
    assert_clean_failure(typo, 2)
    assert "did you mean --threads?" in typo.stderr
    for batch in ("1,,64", "1,x", ""):
        result = call(bench_main, [str(deploy), "--batch", batch], capsys)
        assert_clean_failure(result, 2)
        assert "--batch must be positive integers" in result.stderr


def test_report_files_share_one_mode_policy(deploy, capsys):
    assert call(bench_main, [str(deploy), *FAST_BENCH], capsys).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    for file in (deploy / "reports").iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name
