"""`load_sparse` runs a deploy dir from model.onnx with torch blocked from import, matching
ONNX Runtime within the export's parity limit; and it refuses a model.onnx that disagrees with
its manifest or claims an oversized sparse initializer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from dnr_deploy.deploydir import ManifestError
from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.files import sha256_of
from dnr_deploy.runtime.sparse import load_sparse, onnx_graph
from tests.factories import write_fake_run

REPO = Path(__file__).resolve().parents[1]

# run in a fresh interpreter: torch (and anything importing it) fails to import
TORCH_FREE = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    import numpy as np
    import onnxruntime
    from dnr_deploy.runtime.sparse import load_sparse

    deploy = sys.argv[1]
    limit = json.load(open(deploy + "/manifest.json"))["parity"]["limit"]["limit"]
    x = np.random.default_rng(0).random((21, 1, 8, 8), dtype=np.float32)
    got = load_sparse(deploy)(x)
    session = onnxruntime.InferenceSession(deploy + "/model.onnx",
                                           providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    print(json.dumps({"max_abs": float(np.abs(got - want).max()), "limit": limit,
                      "same_argmax": bool((got.argmax(1) == want.argmax(1)).all()),
                      "torch": [m for m in sys.modules if m.split(".")[0] == "torch"
                                and sys.modules[m] is not None]}))
""")


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("torch_free") / "run"
    write_fake_run(run_dir, "irregular")
    export_run(ExportConfig(run_dir=str(run_dir)))
    return run_dir / "deploy"


def test_runs_with_torch_blocked_and_matches_onnx_runtime(deploy_dir):
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(deploy_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == []
    assert result["same_argmax"]
    assert result["max_abs"] <= result["limit"]


def _rewrite(deploy_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of the deploy dir whose model.onnx went through `change`, re-hashed in the
    manifest (so only the engine's own checks can catch it)."""
    copy = tmp_path / "deploy"
    copy.mkdir()
    for file in deploy_dir.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    model = onnx.load(str(copy / "model.onnx"))
    change(model)
    onnx.save(model, str(copy / "model.onnx"))
    info = json.loads((copy / "manifest.json").read_text())
    info["files"]["model.onnx"] = {"bytes": (copy / "model.onnx").stat().st_size,
                                   "sha256": sha256_of(copy / "model.onnx")}
    (copy / "manifest.json").write_text(json.dumps(info))
    return copy


def test_a_sparse_initializer_the_manifest_does_not_record_is_refused(deploy_dir, tmp_path):
    def drop_one_nonzero(model: onnx.ModelProto) -> None:
        sparse = model.graph.sparse_initializer[0]
        values = onnx.numpy_helper.to_array(sparse.values)[:-1]
        indices = onnx.numpy_helper.to_array(sparse.indices)[:-1]
        sparse.values.CopyFrom(onnx.numpy_helper.from_array(values, sparse.values.name))
        sparse.indices.CopyFrom(onnx.numpy_helper.from_array(indices, sparse.indices.name))

    with pytest.raises(ManifestError, match="nonzeros"):
        load_sparse(_rewrite(deploy_dir, tmp_path, drop_one_nonzero))


def test_oversized_sparse_dims_are_refused_before_allocating(deploy_dir, tmp_path):
    def claim_huge(model: onnx.ModelProto) -> None:
        model.graph.sparse_initializer[0].dims[:] = [1 << 20, 1 << 20]

    with pytest.raises(ManifestError, match="over the bound"):
        load_sparse(_rewrite(deploy_dir, tmp_path, claim_huge))


def test_indices_out_of_range_are_refused():
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.ones(2, np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([0, 12], np.int64), "w_i"), [3, 4])
    with pytest.raises(ManifestError, match="indices"):
        onnx_graph.read_sparse(sparse)
