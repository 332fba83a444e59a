"""--json and --quiet of the console scripts (issue 16): stdout is one JSON document, and
--quiet leaves stderr without progress."""

from __future__ import annotations

import json

from dnr_deploy.cli import compress_main, export_main
from dnr_deploy.progress import progress_silenced

TINY = ["--epochs", "1", "--eval-samples", "50", "--robust-eval-samples", "8",
        "--pgd-steps", "1"]


def test_compress_and_export_print_json_and_stay_quiet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dnr_deploy.progress._silenced", False)
    assert compress_main([*TINY, "--out", "run", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)  # the whole of stdout is the document
    assert summary["run_dir"].endswith("run")
    assert set(summary["accuracy"]) >= {"clean", "pgd20", "autoattack"}
    assert "img/s" not in err and "%|" not in err  # no tqdm bar
    assert progress_silenced()

    monkeypatch.setattr("dnr_deploy.progress._silenced", False)
    assert export_main(["run", "--out", "deploy", "--json", "--parity-samples", "32"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["deploy_dir"].endswith("deploy")
    assert manifest["parity"]["onnx_vs_torch_max_abs"] <= 1e-4


def test_progress_shows_without_quiet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dnr_deploy.progress._silenced", False)
    assert compress_main([*TINY, "--out", "loud"]) == 0
    out, err = capsys.readouterr()
    assert "run dir:" in out and "img" in err  # the bar is there unless silenced
    assert not progress_silenced()
