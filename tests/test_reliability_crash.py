"""Crashes lose nothing that was finished: SIGKILL during training and during a checkpoint
write keeps the previous checkpoint loadable and `--resume` continues it; an export killed
midway leaves no deploy dir that later stages accept; two exports racing to one --out leave
exactly one complete deploy dir.

The kills land at chosen moments: a small driver runs the real CLI in a subprocess with one
function replaced by a stall that first creates a marker file, and the test sends SIGKILL
once the marker exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnr_deploy import files
from dnr_deploy.cli import bench_main, compress_main, export_main, verify_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.deploydir import manifest
from dnr_deploy.deploydir.manifest import MANIFEST_NAME, ManifestError
from dnr_deploy.export import load_deployed_model
from dnr_deploy.files import FolderTaken
from tests.factories import write_fake_run
from tests.helpers import cli_env
from tests.reliability_support import assert_clean_error, call_main

# clean training (fast epochs), a small final ensemble
TRAIN = ["--beta", "1", "--eval-samples", "50", "--robust-eval-samples", "24", "--seed", "1"]

# Runs the real CLI with `torch.save` slowed on its Nth call: half the bytes are written to
# the temporary file, the marker is created, and the process stalls until it is killed.
SAVE_DRIVER = r"""
import io, pathlib, sys, time
import torch
real_save, calls = torch.save, {"n": 0}
stall_at, marker = int(sys.argv[1]), pathlib.Path(sys.argv[2])
def slow_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == stall_at:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        marker.touch()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = slow_save
from dnr_deploy.cli import main
sys.exit(main(sys.argv[3:]))
"""

# Runs the real CLI with one function ("module:name") replaced: "stall" creates the marker
# and sleeps until killed; "barrier" creates the marker, waits until every marker listed
# exists (all racers are ready), then calls the real function.
EXPORT_DRIVER = r"""
import importlib, pathlib, sys, time
target, mode, marker = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
others = [pathlib.Path(p) for p in sys.argv[4].split(",") if p]
module_name, name = target.split(":")
module = importlib.import_module(module_name)
real = getattr(module, name)
def replacement(*args, **kwargs):
    marker.touch()
    if mode == "stall":
        time.sleep(600)
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in others) and time.monotonic() < deadline:
        time.sleep(0.005)
    return real(*args, **kwargs)
setattr(module, name, replacement)
from dnr_deploy.cli import main
sys.exit(main(sys.argv[5:]))
"""
CSR_ONLY = ["--format", "csr"]  # the same build-then-rename path, without the ONNX export


def start(driver: str, args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", driver, *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, job: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"ended early ({job.returncode}): {job.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            job.kill()
            raise AssertionError("the moment to kill never came")
        time.sleep(0.02)


def sigkill(job: subprocess.Popen) -> None:
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL


def metrics_rows(run_dir: Path) -> int:
    file = run_dir / ckpt.METRICS_JSONL
    return len(file.read_text().splitlines()) if file.is_file() else 0


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_during_training_keeps_the_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "dnr_deploy.cli", "compress", "--out", "run", "--epochs", "3",
         *TRAIN], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    wait_for(lambda: metrics_rows(run_dir) >= 1, job)  # epoch 1 is checkpointed ...
    time.sleep(0.3)  # ... and epoch 2 is training (or, on a fast machine, saving)
    sigkill(job)

    state = ckpt.load_checkpoint(run_dir)
    done = state["epoch"]
    assert done >= 1 and len(state["history"]) == done
    # The checkpoint is the record; metrics.jsonl is its view, written just after it, so a kill
    # between the two writes leaves the view one row behind until the resume rewrites it.
    assert metrics_rows(run_dir) in (done - 1, done)
    assert not (run_dir / ckpt.RUN_JSON).exists()  # the run is not finished, and says so
    assert compress_main(["--resume", str(run_dir), "--stop-after", str(done + 1)]) == 0
    resumed = ckpt.load_checkpoint(run_dir)
    assert resumed["epoch"] == done + 1
    assert resumed["history"][:done] == state["history"]  # continued, not restarted
    assert metrics_rows(run_dir) == done + 1
    assert temp_files(run_dir) == []


@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    # torch.save calls: 1 the initial checkpoint, 2 epoch 1's, 3 epoch 2's (killed mid-write)
    job = start(SAVE_DRIVER, ["3", str(marker), "compress", "--out", "run", "--epochs", "3",
                              *TRAIN], tmp_path)
    wait_for(marker.exists, job)
    sigkill(job)

    leftovers = temp_files(run_dir)
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.")  # half written
    state = ckpt.load_checkpoint(run_dir)  # the previous checkpoint, whole
    assert state["epoch"] == 1 and metrics_rows(run_dir) == 1
    with pytest.raises(ckpt.CheckpointError):  # what was being written is not a checkpoint
        ckpt.load_checkpoint(run_dir / leftovers[0])

    assert compress_main(["--resume", str(run_dir), "--stop-after", "2"]) == 0
    assert ckpt.load_checkpoint(run_dir)["epoch"] == 2 and metrics_rows(run_dir) == 2
    assert temp_files(run_dir) == []  # the resume removed the killed writer's temp file


@pytest.fixture
def fake_runs(tmp_path) -> dict[str, Path]:
    """Two finished runs (irregular, densities 5% and 10%): their bundles differ."""
    runs = {"a": tmp_path / "run-a", "b": tmp_path / "run-b"}
    write_fake_run(runs["a"], "irregular", density=0.05)
    write_fake_run(runs["b"], "irregular", density=0.1)
    return runs


def assert_complete_deploy_dir(out: Path) -> dict:
    """A deploy dir whose every file is listed with a matching sha256, and nothing else."""
    info = manifest.load_manifest(out)
    manifest.verify_files(out, info)
    assert sorted(p.name for p in out.iterdir()) == sorted([*info["files"], MANIFEST_NAME])
    return info


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("moment", ["dnr_deploy.deploydir.manifest:build_manifest",
                                    "dnr_deploy.export.deploy:publish_folder"])
def test_export_killed_midway_leaves_nothing_later_stages_accept(moment, fake_runs, tmp_path):
    """Killed with the weights written but no manifest, or with everything written but not
    yet renamed: --out does not exist, so no stage can take a partial deploy dir."""
    run_dir, marker = fake_runs["a"], tmp_path / "exporting"
    out = tmp_path / "deploy"
    job = start(EXPORT_DRIVER, [moment, "stall", str(marker), "", "export", str(run_dir),
                                "--out", str(out), *CSR_ONLY], tmp_path)
    wait_for(marker.exists, job)
    sigkill(job)

    assert not out.exists()
    with pytest.raises(ManifestError, match="not a deploy dir"):
        load_deployed_model(out)
    for prog, main in (("dnr-bench", bench_main), ("dnr-verify", verify_main)):
        outcome = call_main(main, [str(out)])
        assert "does not exist" in assert_clean_error(outcome.code, outcome.err, prog)
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".deploy.")]
    assert len(hidden) == 1  # the killed export's build folder: no stage looks there
    if moment.endswith("publish_folder"):  # a new export is not disturbed by the leftover
        outcome = call_main(export_main, [str(run_dir), "--out", str(out), *CSR_ONLY])
        assert outcome.code == 0, outcome.err
        assert_complete_deploy_dir(out)


@pytest.mark.slow
@pytest.mark.ci
def test_two_exports_racing_to_one_out_leave_one_complete_deploy_dir(fake_runs, tmp_path):
    out = tmp_path / "deploy"
    ready = {kind: tmp_path / f"ready-{kind}" for kind in fake_runs}
    jobs = {kind: start(EXPORT_DRIVER, [
        "dnr_deploy.export.deploy:publish_folder", "barrier", str(ready[kind]),
        ",".join(map(str, ready.values())), "export", str(run_dir), "--out", str(out),
        *CSR_ONLY], tmp_path)
        for kind, run_dir in fake_runs.items()}
    results = {kind: job.communicate(timeout=600) for kind, job in jobs.items()}
    codes = {kind: job.returncode for kind, job in jobs.items()}
    assert sorted(codes.values()) == [0, 2], (codes, results)

    winner = next(kind for kind, code in codes.items() if code == 0)
    loser = next(kind for kind, code in codes.items() if code == 2)
    line = assert_clean_error(2, results[loser][1], "dnr-export")
    assert "was filled while this export ran" in line
    info = assert_complete_deploy_dir(out)  # the winner's, whole: never a mix of both
    assert info["source_run"]["dir"] == str(fake_runs[winner].resolve())
    assert info["density"]["target"] == {"a": 0.05, "b": 0.1}[winner]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rename_onto_out_is_all_or_nothing(tmp_path):
    """The rename step alone, each case the race can produce."""
    def work(name: str, content: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_text(content)
        return folder

    out = tmp_path / "out"
    out.mkdir()  # an empty --out is replaced in one step
    files._move_into_place(work("a", "A"), out, force=False)
    assert (out / "model.onnx").read_text() == "A"
    with pytest.raises(FolderTaken, match="was filled while this export ran"):
        files._move_into_place(work("b", "B"), out, force=False)
    assert (out / "model.onnx").read_text() == "A" and (tmp_path / "b").exists()
    files._move_into_place(tmp_path / "b", out, force=True)  # --force replaces it
    assert (out / "model.onnx").read_text() == "B"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FolderTaken):
        files._move_into_place(work("c", "C"), tmp_path / "file", force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "file", "out"]
    assert os.listdir(out) == ["model.onnx"]


def test_checkpoint_temp_files_are_ignored_and_removed_on_resume(tmp_path):
    """What a writer killed mid-write leaves (".NAME.*.tmp") is never read as a checkpoint,
    and remove_stale_temps deletes only such files."""
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    (run_dir / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run_dir / ".deploy.xyz.tmp").mkdir()  # an export's build folder: not ours to delete
    assert ckpt.load_checkpoint(run_dir)["epoch"] == 1
    assert ckpt.remove_stale_temps(run_dir) == [".checkpoint.pt.abc123.tmp"]
    assert (run_dir / ".deploy.xyz.tmp").is_dir()
    outcome = call_main(compress_main, ["--resume", str(run_dir / ".checkpoint.pt.x.tmp")])
    assert_clean_error(outcome.code, outcome.err, "dnr-compress")
