"""dnr-report: one summary read back from a run dir and its deploy dir, as a table, JSON and a
self-contained HTML page (rendered in headless Chromium where it is installed)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dnr_deploy.cli import report_main
from dnr_deploy.compress.checkpoint import write_json
from tests.factories import write_fake_run

# A 1x1 PNG: the report embeds whatever the stages drew, so any valid PNG stands in for a plot.
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDw"
                         "AEhQGAhKmMIQAAAABJRU5ErkJggg==")


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run dir with run.json, plots, and a deploy dir holding a manifest and verify.json."""
    run_dir = tmp_path / "run"
    run = write_fake_run(run_dir)
    run["accuracy"]["autoattack"] = 0.485
    run["robustness"] = {"images": 360}
    write_json(run_dir / "run.json", run)
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "training.png").write_bytes(PIXEL)
    deploy = run_dir / "deploy"
    (deploy / "reports").mkdir(parents=True)
    write_json(deploy / "manifest.json", {
        "source_run": {"dir": str(run_dir.resolve())}, "params": run["params"],
        "files": {"model.onnx": {"bytes": 2048, "sha256": "0" * 64}},
        "parity": {"onnx_vs_torch_max_abs": 3e-6, "argmax_agree": 360, "n_images": 360}})
    write_json(deploy / "reports" / "verify.json", {
        "attack": {"name": "autoattack"}, "threat_model": {"eps": 0.2},
        "images": {"first": 360, "of": 360}, "accuracy": {"clean": 0.99, "robust": 0.47},
        "stages": [{"attack": "apgd-ce", "robust_after": 0.53}],
        "comparison": {"gated": True, "passed": False, "reference": 0.485,
                       "reasons": ["worst case 1.5 points below the training side's"]}})
    return run_dir


def test_table_reads_every_stage_and_the_page_is_self_contained(finished_run, capsys):
    assert report_main([str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "AutoAttack-grade worst case    48.50% on the first 360 test images" in out
    assert "worst case" in out and "47.00%" in out
    assert "gate" in out and "FAIL: worst case 1.5 points below" in out
    page = (finished_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # the one plot that exists, inline
    assert "src=\"http" not in page and "<link" not in page  # nothing fetched from elsewhere
    assert "48.50%" in page


def test_a_deploy_dir_finds_its_run_and_json_says_the_same(finished_run, capsys):
    assert report_main([str(finished_run / "deploy"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"].endswith("run") and summary["deploy_dir"].endswith("deploy")
    assert summary["sections"]["dnr-verify (autoattack, Linf eps 0.2, 360 of 360 test images)"][
        "worst case"] == "47.00%"


def test_what_is_not_a_run_or_deploy_dir_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a run dir" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    assert report_main([str(tmp_path / "broken")]) == 2
    assert "cannot read" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install "
                    "chromium) to render the HTML report")
def test_page_renders_in_headless_chromium(finished_run, capsys, tmp_path):
    assert report_main([str(finished_run)]) == 0
    shot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1000,1400", (finished_run / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
