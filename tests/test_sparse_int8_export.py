"""dnr-export --quantize int8 on an irregular run: a dense QDQ model.onnx that ONNX Runtime
runs, the sparse float graph kept as model.fp32.onnx, and weights.int8.npz holding exactly the
integers of model.onnx's weights as CSR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dnr_deploy.deploydir import names
from dnr_deploy.export.sparse_int8 import INT8_CSR_FILE, Int8CsrError, read_int8_csr
from tests.factories import int8_irregular_deploy_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    return int8_irregular_deploy_dir(tmp_path_factory.mktemp("sparse-int8") / "run")


@pytest.mark.ci
def test_irregular_int8_deploy_dir_records_its_int8_csr(deploy):
    manifest = json.loads((deploy / names.MANIFEST_NAME).read_text())
    assert {names.MODEL_FILE, names.FP32_MODEL_FILE, names.CSR_FILE, INT8_CSR_FILE} <= \
        set(manifest["files"])
    record = manifest["quantization"]
    assert isinstance(record["reduce_range"], bool) and record["reduce_range_reason"]
    assert 0 <= record["int8_vs_reference_max_abs"] <= record["int8_atol"]
    sparse = record["sparse_int8"]
    assert sparse["file"] == INT8_CSR_FILE and sparse["layers"] == 5
    assert sparse["bytes_vs_float_csr"] <= 0.5  # the goal, on this run
    fp32 = onnx.load(str(deploy / names.FP32_MODEL_FILE)).graph
    assert len(fp32.sparse_initializer) > 0  # the float graph keeps its sparse form


def test_int8_csr_holds_model_onnx_integers(deploy):
    graph = onnx.load(str(deploy / names.MODEL_FILE)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    layers = read_int8_csr(deploy / INT8_CSR_FILE)
    for layer in layers:
        dq = producer[nodes[layer.node].input[1]]
        q = inits[dq.input[0]]
        if layer.op == "Gemm" and q.shape != layer.shape:
            q = q.T
        assert np.array_equal(layer.dense(), q.reshape(q.shape[0], -1).astype(np.int32))
        assert np.allclose(layer.scale, np.broadcast_to(inits[dq.input[1]], layer.scale.shape))
    # activations: per tensor, uint8; the first conv reads normalized pixels
    assert all(0 <= layer.input_zero_point <= 255 and layer.input_scale > 0 for layer in layers)


def test_damaged_int8_csr_is_refused(deploy, tmp_path):
    bad = tmp_path / INT8_CSR_FILE
    with np.load(deploy / INT8_CSR_FILE, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays["0/indptr"] = arrays["0/indptr"][::-1].copy()
    np.savez(bad, **arrays)
    with pytest.raises(Int8CsrError, match="not consistent"):
        read_int8_csr(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(Int8CsrError, match="unreadable"):
        read_int8_csr(bad)


def test_int8_sparse_path_runs_the_deploy_dir_as_onnx_runtimes_int8_math(deploy):
    from dnr_deploy.export.quantize import reference_session
    from dnr_deploy.runtime.sparse import int8
    from dnr_deploy.runtime.sparse.int8_graph import Int8Graph

    if not int8.supported_paths():
        pytest.skip("_int8_kernels not built")
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    graph = Int8Graph(deploy)
    assert len(graph.int8_nodes) == 5  # every conv and the classifier in the int8 kernels
    ours = graph(x)
    reference = reference_session(deploy / names.MODEL_FILE).run(None, {names.INPUT_NAME: x})[0]
    # a rounding boundary crossed somewhere may move a logit by a few of its steps
    assert np.abs(ours - reference).max() <= 0.25  # the export's default --int8-atol
    portable = Int8Graph(deploy, path="portable")(x)
    assert np.array_equal(portable, ours)  # every path the same integers


@pytest.mark.parametrize("size,height,width", [(2, 8, 8), (2, 7, 9), (3, 9, 6)])
def test_int8_graph_max_pool_is_the_window_maximum(size, height, width):
    """On uint8 (the graph pools quantized values: dequantizing is monotone) and on float, in
    the CHWN layout the graph keeps its activations in."""
    from dnr_deploy.runtime.sparse.int8_graph import _max_pool

    rng = np.random.default_rng(size)
    for x in (rng.integers(0, 256, (2, 3, height, width)).astype(np.uint8),
              rng.standard_normal((2, 3, height, width)).astype(np.float32)):
        h, w = height // size * size, width // size * size
        want = x[:, :, :h, :w].reshape(2, 3, h // size, size, w // size, size).max(axis=(3, 5))
        got = _max_pool(np.ascontiguousarray(x.transpose(1, 2, 3, 0)),
                        {"kernel_shape": [size, size]})
        assert got.dtype == x.dtype and np.array_equal(got.transpose(3, 0, 1, 2), want)
