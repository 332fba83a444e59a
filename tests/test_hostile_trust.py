"""Artifacts are untrusted input (DESIGN.md section 9): no code from artifacts, reads and
writes only inside the dir given, `--force` deletes only a deploy dir this toolkit wrote.

Every hostile dir is built here, from the fake run of tests/factories.py (no training). The
module an artifact names would leave a marker file if it were ever imported; each refusal is
exit code 2 with one line on stderr, and the marker stays absent.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import torch

from dnr_deploy.cli import bench_main, compress_main, export_main, report_main, verify_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.deploydir import manifest
from dnr_deploy.deploydir.opening import DeployDir, DeployDirError, reports_dir
from dnr_deploy.export import load_deployed_model, load_source
from tests.factories import make_deploy_dir, write_fake_run

EVIL = "evil_trust_probe"  # the module a hostile artifact names
SPEC = f"{EVIL}:build"
MODULE_TEXT = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # what any code from an artifact could do


def build(num_classes, in_chans):
    from dnr_deploy.models.registry import _MODELS
    return _MODELS["small"](num_classes=num_classes, in_chans=in_chans)
"""
SECRET = b"SECRET-TOKEN-do-not-embed"


def one_line(code: int, err: str, expected: int = 2) -> str:
    """The refusal: the exit code and exactly one line on stderr, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dnr-"), lines[0]
    return lines[0]


@pytest.fixture
def evil_cwd(tmp_path, monkeypatch) -> Path:
    """The working folder holds EVIL.py and is on the import path (as `PYTHONPATH=.` in the
    README's own-model example, or `python -m`): importing it writes `marker`."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{EVIL}.py").write_text(MODULE_TEXT.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop(EVIL, None)


def hostile_run(folder: Path, spec: str = SPEC) -> Path:
    """A finished run whose run.json and checkpoint name `spec` as the model."""
    write_fake_run(folder)
    run = json.loads((folder / ckpt.RUN_JSON).read_text())
    run["model"]["name"] = run["config"]["model"] = spec
    ckpt.write_json(folder / ckpt.RUN_JSON, run)
    return folder


@pytest.fixture(scope="module")
def irregular_deploy(tmp_path_factory) -> Path:
    """A real irregular deploy dir (exported from the fake run), shared read-only."""
    root = tmp_path_factory.mktemp("deploy")
    write_fake_run(root / "run")
    assert export_main([str(root / "run"), "--parity-samples", "16", "--quiet"]) == 0
    return root / "run" / "deploy"


def hostile_copy(deploy: Path, folder: Path, spec: str = SPEC) -> Path:
    """A copy of `deploy` whose manifest names `spec` (the manifest lists no hash of itself)."""
    folder.mkdir()
    for file in deploy.iterdir():
        if file.is_file():
            (folder / file.name).write_bytes(file.read_bytes())
    info = json.loads((folder / manifest.MANIFEST_NAME).read_text())
    info["model"]["name"] = spec
    (folder / manifest.MANIFEST_NAME).write_text(json.dumps(info))
    return folder


# 1. An artifact chooses no code to run.

def test_export_does_not_import_the_module_run_json_names(evil_cwd, tmp_path, capsys):
    run = hostile_run(tmp_path / "run")
    line = one_line(export_main([str(run)]), capsys.readouterr().err)
    assert f"module {EVIL!r} was not imported" in line and "--trust-model-code" in line
    assert not evil_cwd.exists() and not (run / "deploy").exists()
    line = one_line(export_main([str(run), "--model", "other_pkg:net"]), capsys.readouterr().err)
    assert "is not the model" in line and not evil_cwd.exists()


@pytest.mark.parametrize("how", [{"model_spec": SPEC}, {"trust_model_code": True}])
def test_a_spec_the_user_names_or_trusts_is_honoured(evil_cwd, tmp_path, how):
    source = load_source(hostile_run(tmp_path / "run"), **how)
    assert evil_cwd.exists() and source.run["model"]["name"] == SPEC


def test_resume_does_not_import_the_module_a_checkpoint_names(evil_cwd, tmp_path, capsys):
    run = hostile_run(tmp_path / "run")
    state = torch.load(run / ckpt.CHECKPOINT_NAME, weights_only=True)
    ckpt.save_checkpoint(run, {**state, "config": {**state["config"], "model": SPEC}})
    line = one_line(compress_main(["--resume", str(run)]), capsys.readouterr().err)
    assert f"module {EVIL!r} was not imported" in line and not evil_cwd.exists()


@pytest.mark.parametrize("recipe", [f"model: {SPEC}\n", "trust_model_code: true\n"])
def test_a_recipe_names_no_code_and_grants_no_trust(evil_cwd, tmp_path, capsys, recipe):
    (tmp_path / "recipe.yaml").write_text(recipe)
    line = one_line(compress_main(["--config", "recipe.yaml", "--out", "r"]),
                    capsys.readouterr().err)
    assert "not imported" in line or "only the command line" in line
    assert not evil_cwd.exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.ci  # a real export (about 15 s here), shared by both
def test_loading_a_deploy_dir_imports_nothing_it_names(evil_cwd, irregular_deploy, tmp_path,
                                                       capsys):
    deploy = hostile_copy(irregular_deploy, tmp_path / "deploy")
    with pytest.raises(manifest.ManifestError, match="was not imported"):
        load_deployed_model(deploy)
    # the sparse engine reads model.onnx alone: it runs the dir and never needs the spec
    fast = ["--runtime", "sparse", "--quiet"]
    assert bench_main([str(deploy), *fast, "--batch", "1", "--runs", "1", "--warmup", "0"]) == 0
    assert verify_main([str(deploy), *fast, "--attack", "pgd", "--n", "8", "--no-gate"]) == 0
    capsys.readouterr()
    assert not evil_cwd.exists()
    load_deployed_model(deploy, model=SPEC)  # named: honoured
    assert evil_cwd.exists()


# 2. Reads stay inside the dir given; writes go where the user pointed.

def test_report_never_embeds_a_linked_plot(tmp_path, capsys):
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET)
    run = tmp_path / "run"
    write_fake_run(run)
    (run / "plots").mkdir()
    (run / "plots" / "training.png").symlink_to(secret)
    assert report_main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert base64.b64encode(SECRET).decode() not in page and "data:image/png" not in page
    capsys.readouterr()
    (run / "plots").rename(run / "plots.real")
    (run / "plots").symlink_to(tmp_path)  # a linked folder: the same refusal
    assert report_main([str(run)]) == 0
    assert "data:image/png" not in (run / "report.html").read_text()


def test_a_linked_json_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    write_fake_run(run)
    (tmp_path / "elsewhere.json").write_bytes((run / ckpt.RUN_JSON).read_bytes())
    (run / ckpt.RUN_JSON).unlink()
    (run / ckpt.RUN_JSON).symlink_to(tmp_path / "elsewhere.json")
    line = one_line(report_main([str(run)]), capsys.readouterr().err)
    assert "symbolic link" in line
    line = one_line(export_main([str(run)]), capsys.readouterr().err)
    assert "symbolic link" in line


def test_report_writes_into_the_dir_given_not_where_a_manifest_points(tmp_path, capsys):
    elsewhere = tmp_path / "far" / "away"
    write_fake_run(elsewhere)
    deploy = make_deploy_dir(tmp_path / "deploy")
    info = json.loads((deploy / manifest.MANIFEST_NAME).read_text())
    info["source_run"]["dir"] = str(elsewhere)
    (deploy / manifest.MANIFEST_NAME).write_text(json.dumps(info))
    assert report_main([str(deploy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] is None  # not read either
    assert not (elsewhere / "report.html").exists()
    assert (deploy / "reports" / "report.html").is_file()


def test_a_listed_file_that_is_a_link_is_refused(tmp_path, capsys):
    deploy = make_deploy_dir(tmp_path / "deploy")
    outside = tmp_path / "outside.onnx"
    (deploy / "model.onnx").rename(outside)  # same bytes, so its sha256 still matches
    (deploy / "model.onnx").symlink_to(outside)
    line = one_line(bench_main([str(deploy), "--quiet", "--runs", "1", "--warmup", "0",
                                "--batch", "1"]), capsys.readouterr().err)
    assert "symbolic link" in line


def test_reports_go_nowhere_through_a_linked_reports_folder(tmp_path):
    deploy = make_deploy_dir(tmp_path / "deploy")
    (deploy / "reports").symlink_to(tmp_path)
    with pytest.raises(DeployDirError, match="symbolic link"):
        reports_dir(DeployDir(deploy, {}), None)


@pytest.mark.parametrize("pointer", ["../victim", "/tmp", "runs/../../victim", "linked", ""])
def test_latest_names_only_a_folder_beside_it(tmp_path, monkeypatch, capsys, pointer):
    monkeypatch.chdir(tmp_path)
    write_fake_run(tmp_path / "victim")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "victim")
    (tmp_path / "runs" / "LATEST").write_text(pointer + "\n")
    for main in (report_main, export_main):
        line = one_line(main([]), capsys.readouterr().err)
        assert "LATEST" in line
    assert not (tmp_path / "victim" / "report.html").exists()
    assert not (tmp_path / "victim" / "deploy").exists()


# 6. --force replaces only a deploy dir dnr-export wrote.

def test_force_refuses_a_folder_of_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    write_fake_run(run)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    line = one_line(export_main([str(run), "--out", str(other), "--force"]),
                    capsys.readouterr().err)
    assert "only a deploy dir" in line
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    second = tmp_path / "second_run"
    write_fake_run(second)
    line = one_line(export_main([str(run), "--out", str(second), "--force"]),
                    capsys.readouterr().err)
    assert "only a deploy dir" in line and (second / ckpt.CHECKPOINT_NAME).is_file()


@pytest.mark.slow
@pytest.mark.ci  # a real export (about 15 s here), shared by both
def test_force_replaces_an_earlier_deploy_dir_and_nothing_else(irregular_deploy, tmp_path,
                                                               capsys):
    run = irregular_deploy.parent
    out = tmp_path / "out"
    out.mkdir()
    for file in irregular_deploy.iterdir():
        if file.is_file():
            (out / file.name).write_bytes(file.read_bytes())
    (out / "reports").mkdir()
    (out / "reports" / "bench.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not the toolkit's: refused
    line = one_line(export_main([str(run), "--out", str(out), "--force"]),
                    capsys.readouterr().err)
    assert "notes.txt" in line and (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    before = json.loads((out / manifest.MANIFEST_NAME).read_text())["export_seconds"]
    assert export_main([str(run), "--out", str(out), "--force", "--parity-samples", "16",
                        "--quiet"]) == 0
    after = manifest.load_manifest(out)
    manifest.verify_files(out, after)
    assert after["export_seconds"] != before and not (out / "reports").exists()


def test_force_refuses_a_link(tmp_path, capsys):
    deploy = make_deploy_dir(tmp_path / "deploy")
    run = tmp_path / "run"
    write_fake_run(run)
    (tmp_path / "link").symlink_to(deploy)
    line = one_line(export_main([str(run), "--out", str(tmp_path / "link"), "--force"]),
                    capsys.readouterr().err)
    assert "symbolic link" in line and (deploy / manifest.MANIFEST_NAME).is_file()


def test_a_widened_registry_net_is_not_model_code():
    """`small:4` (the capacity benchmark's widths) names a registry net: export and resume of
    a widened run must not ask for --model (it did: 'module small was not imported')."""
    from dnr_deploy.trust import imports_code

    assert not imports_code("small:4") and not imports_code("torchvision:resnet18")
    assert imports_code("evil:build") and imports_code("pkg.mod:make_net")
