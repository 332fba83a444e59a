"""`--runtime sparse` on an irregular int8 deploy dir: bench times its int8 CSR in `Int8Graph`,
and verify's attacks are scored by it (Square's queries included), once its logits match ONNX
Runtime's reference int8 math within the export's int8 limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dnr_deploy.deploydir import names
from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.export.sparse_int8 import INT8_CSR_FILE
from dnr_deploy.runtime import runtimes
from dnr_deploy.runtime.sparse import int8
from dnr_deploy.runtime.sparse.int8_graph import Int8Graph
from tests.factories import int8_irregular_deploy_dir

pytestmark = pytest.mark.skipif(not int8.supported_paths(), reason="_int8_kernels not built")


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    return int8_irregular_deploy_dir(tmp_path_factory.mktemp("int8-runtime") / "run")


def test_open_sparse_gives_the_int8_runner_and_auto_stays_on_onnx_runtime(deploy):
    model = runtimes.open_sparse(deploy, 1)
    assert isinstance(model, Int8Graph) and runtimes.is_int8(model)
    info = runtimes.sparse_info(model, 1)
    assert info["dtype"] == "int8" and info["kernel"] == int8.kernel_name()
    manifest = json.loads((deploy / names.MANIFEST_NAME).read_text())
    chosen, why = runtimes.choose_runtime("auto", manifest, "cpu")
    assert chosen is runtimes.Runtime.ORT and "int8" in why
    macs = model.macs(manifest["input_shape"])
    assert 0 < macs["nonzero"] < macs["dense"]  # the int8 CSR's nonzeros, not dense weights


def test_bench_times_the_int8_sparse_runtime_against_the_reference_int8_math(deploy, tmp_path):
    from dnr_deploy.runtime.bench import BenchConfig, bench, format_table

    report = bench(BenchConfig(deploy_dir=str(deploy), runtime="sparse", batch="1,4",
                               runs=3, warmup=1, out=str(tmp_path))).report
    runtime, manifest = report["runtime"], json.loads((deploy / names.MANIFEST_NAME).read_text())
    assert runtime["dtype"] == "int8" and runtime["engine"].endswith("int8_graph")
    assert runtime["parity"]["max_abs"] <= manifest["quantization"]["int8_atol"]
    comparison = report["int8_vs_float"]
    assert comparison["files"] == [INT8_CSR_FILE, names.CSR_FILE]
    files = manifest["files"]
    assert comparison["file_size_ratio"] == pytest.approx(
        files[names.CSR_FILE]["bytes"] / files[INT8_CSR_FILE]["bytes"])
    assert "int8 sparse runtime" in format_table(report)


def test_verify_scores_every_query_with_the_int8_engine(deploy, tmp_path, monkeypatch):
    from dnr_deploy.runtime.verify import VerifyConfig, verify

    calls = []
    original = Int8Graph.__call__

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(Int8Graph, "__call__", counted)
    result = verify(VerifyConfig(deploy_dir=str(deploy), runtime="sparse", attack="square",
                                 queries=20, n=24, batch_size=8, no_gate=True,
                                 out=str(tmp_path)))
    report = result.report
    assert report["attack"]["scored_by"] == "dnr_deploy.runtime.sparse.int8_graph"
    assert report["runtime"]["dtype"] == "int8"
    # parity, clean and final scoring in batches of 8; Square queries only the images still
    # classified correctly, one call per iteration: those calls went to the int8 engine too
    attacked = round(report["accuracy"]["clean"] * 24)
    assert attacked > 0  # the fixture's run gets some right, so Square has work
    assert calls.count(8) >= 3 * 3
    assert sum(1 for size in calls if size <= attacked) >= 10


def test_a_damaged_int8_csr_is_refused_before_anything_runs(deploy, tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    path = copy / INT8_CSR_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        runtimes.open_sparse(copy, 1)


def test_parity_forgives_a_differing_prediction_only_on_a_near_tie():
    reference = np.array([[1.0, 1.05, 0.0], [3.0, 0.0, 0.0]], np.float32)
    near_tie = np.array([[1.06, 1.0, 0.0], [3.0, 0.0, 0.0]], np.float32)
    record = runtimes.check_parity(near_tie, reference, "two images", atol=0.1)
    assert record["near_ties_differing"] == 1 and not record["same_argmax"]
    flipped = np.array([[0.0, 0.0, 0.0], [2.5, 3.0, 0.0]], np.float32)
    reference = np.array([[0.0, 0.0, 0.0], [3.0, 2.5, 0.0]], np.float32)
    with pytest.raises(runtimes.RuntimeChoiceError, match="argmax different"):
        runtimes.check_parity(flipped, reference, "two images", atol=0.1)


@pytest.mark.slow
@pytest.mark.ci
def test_residual_network_runs_in_chwn_as_the_reference_int8_math(tmp_path):
    """ResNet-18's QDQ graph (residual Adds, shortcut convs, a ReduceMean before the Gemm) in
    Int8Graph, whose activations stay CHWN between layers: the reference int8 math's logits,
    on every kernel path this CPU runs."""
    from dnr_deploy.export.quantize import reference_session

    # half the weights kept: at 5% the random net's logits are the same for every image;
    # 7-bit weights (--reduce-range on), so that the AVX2 path runs it too
    deploy = int8_irregular_deploy_dir(tmp_path / "run", "--reduce-range", "on", density=0.5,
                                       model_name="resnet18")
    x = np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)
    reference = reference_session(deploy / names.MODEL_FILE).run(
        None, {names.INPUT_NAME: x})[0]
    assert np.ptp(reference, axis=0).max() > 0  # the images get different logits
    graph = runtimes.open_sparse(deploy, 1)
    assert len(graph.int8_nodes) == 21  # 20 convs and the classifier
    ours = graph(x)
    atol = json.loads((deploy / names.MANIFEST_NAME).read_text())["quantization"]["int8_atol"]
    assert np.abs(ours - reference).max() <= atol
    assert np.array_equal(graph(x), ours)  # a second call: no buffer of the first leaks in
    for path in int8.supported_paths():
        assert np.array_equal(Int8Graph(deploy, path=path)(x), ours)


def test_an_inconsistent_int8_csr_with_a_matching_manifest_is_one_line_and_exit_2(
        deploy, tmp_path, capsys):
    """A forger who rewrites the manifest's sha256 gets past the hash table, not the reader:
    dnr-run (either install) refuses the CSR in one line."""
    import hashlib

    from dnr_deploy.runtime.sparse import run_cli

    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    path = copy / INT8_CSR_FILE
    with np.load(path, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays["0/indptr"] = arrays["0/indptr"][::-1].copy()
    np.savez(path, **arrays)
    manifest = json.loads((copy / names.MANIFEST_NAME).read_text())
    data = path.read_bytes()
    manifest["files"][INT8_CSR_FILE].update(sha256=hashlib.sha256(data).hexdigest(),
                                            bytes=len(data))
    (copy / names.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert run_cli.run([str(copy), "--batch", "1", "--runs", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "unsigned" not in line]
    assert len(errors) == 1 and "not consistent CSR" in errors[0]
