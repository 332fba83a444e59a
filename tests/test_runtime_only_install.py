"""The runtime-only install (runtime-dist/): a fresh venv gets dnr-deploy-runtime and its two
dependencies (numpy, onnx) from the configured package sources, has no torch, and its `dnr-run`
classifies a deploy dir made here as ONNX Runtime does: a float one, and an int8 one on the
int8 kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dnr_deploy.export import ExportConfig, export_run
from tests.factories import write_fake_run

REPO = Path(__file__).resolve().parents[1]


def kept_modules() -> set[str]:
    """The modules runtime-dist/setup.py ships (its KEEP, read without running the file)."""
    tree = ast.parse((REPO / "runtime-dist" / "setup.py").read_text())
    keep = next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "KEEP")
    modules = set(keep)
    for package, names in keep.items():
        folder = REPO.joinpath(*package.split("."))
        stems = names if names is not None else {p.stem for p in folder.glob("*.py")}
        modules |= {f"{package}.{stem}" for stem in stems if stem != "__init__"}
    return modules


def test_every_module_a_shipped_module_imports_is_shipped():
    """Fast, beside the slow install test: stop 39's arena.py was imported by plan.py but not
    shipped, which only a fresh runtime-only venv would have shown."""
    kept = kept_modules()
    missing = set()
    for module in kept:
        path = REPO.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        # module-level imports only: one inside a function runs only where it is called (the
        # package's lazy entry points to training, which the runtime never calls)
        body = ast.parse(path.read_text()).body
        for node in body + [n for t in body if isinstance(t, ast.Try) for n in t.body]:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.startswith("dnr_deploy"):
                targets = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
                if not targets & kept:
                    missing.add(f"{module} imports {node.module}")
            elif isinstance(node, ast.Import):
                missing |= {f"{module} imports {alias.name}" for alias in node.names
                            if alias.name.startswith("dnr_deploy") and alias.name not in kept}
    assert not missing, sorted(missing)


@pytest.mark.slow
def test_runtime_only_venv_runs_a_deploy_dir_without_torch(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    export_run(ExportConfig(run_dir=str(run_dir)))
    deploy = run_dir / "deploy"
    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "int8"), quantize="int8",
                            int8_max_drop=100.0))
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(REPO / "runtime-dist")],
                   check=True, timeout=1200, cwd=tmp_path)
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    # 25 images: a chunk of 16 (where generated code runs, on AVX-512) and a shorter one
    images = np.random.default_rng(0).random((25, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", images)
    done = subprocess.run([str(venv / "bin" / "dnr-run"), str(deploy), "--images",
                           str(tmp_path / "x.npy"), "--logits", str(tmp_path / "logits.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(deploy / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": images})[0]
    assert [int(c) for c in done.stdout.split()] == want.argmax(1).tolist()
    assert np.abs(np.load(tmp_path / "logits.npy") - want).max() <= 1e-4
    int8_run = subprocess.run([str(venv / "bin" / "dnr-run"), str(tmp_path / "int8"), "--images",
                               str(tmp_path / "x.npy"), "--logits", str(tmp_path / "q.npy")],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert int8_run.returncode == 0, int8_run.stderr
    reference = onnxruntime.InferenceSession(  # ONNX Runtime's reference int8 math
        str(tmp_path / "int8" / "model.onnx"), providers=["CPUExecutionProvider"],
        sess_options=_unoptimized()).run(None, {"input": images})[0]
    assert np.abs(np.load(tmp_path / "q.npy") - reference).max() <= 0.25  # --int8-atol
    timing = subprocess.run([str(venv / "bin" / "dnr-run"), str(tmp_path / "int8"), "--batch",
                             "1", "--runs", "2", "--json"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert timing.returncode == 0 and '"kernel": "int8 cpp-' in timing.stdout, timing.stderr
    refused = subprocess.run([str(venv / "bin" / "dnr-run"), str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1


def _unoptimized() -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options
