"""The int8 sparse kernels: every compiled path this CPU runs equals the numpy reference bit for
bit (integer sums, one float epilogue), and the reference equals ONNX Runtime's reference int8
math (its QDQ graph with optimizations off) to within one quantization step."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.sparse
from onnx import TensorProto, helper, numpy_helper

from dnr_deploy.runtime.sparse import int8

pytestmark = pytest.mark.skipif(not int8.supported_paths(), reason="_int8_kernels not built")

# (out, in, kernel, stride, padding, size, batch, relu, residual, requantize)
CASES = [(16, 8, 3, 1, 1, 6, 3, True, False, True), (32, 16, 3, 2, 1, 9, 2, False, True, True),
         (10, 40, 1, 1, 0, 1, 5, False, False, False), (24, 12, 3, 1, 1, 8, 16, True, True, False),
         (8, 5, 1, 2, 0, 7, 1, True, False, True),  # this one and the one before: 32-chunks
         (32, 24, 3, 1, 1, 2, 16, True, True, True)]  # 32-chunks of pixels only


def _layer(rng, case, limit: int = 127, density: float = 0.2):
    o, c, k, s, p, h, n, relu, res, quant = case
    w = rng.integers(-limit, limit + 1, (o, c, k, k)).astype(np.int8)
    w[rng.random(w.shape) > density] = 0
    m = scipy.sparse.csr_array(w.reshape(o, -1).astype(np.int32))
    layer = int8.Int8SparseConv(
        w.shape, s, p, m.indptr, m.indices, m.data.astype(np.int8),
        (rng.random(o) * 0.01 + 1e-3).astype(np.float32), rng.normal(size=o).astype(np.float32),
        0.02, int(rng.integers(0, 256)), relu, 0.05 if quant else None,
        int(rng.integers(0, 40)) if quant else None)
    x = rng.integers(0, 256, (c, h, h, n)).astype(np.uint8)
    ho = (h + 2 * p - k) // s + 1
    residual = rng.normal(size=(o, ho, ho, n)).astype(np.float32) if res else None
    return w, layer, x, residual


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", int8.supported_paths())
def test_every_path_equals_the_reference_exactly(case, path):
    rng = np.random.default_rng(len(path) * 100 + CASES.index(case))
    w, layer, x, residual = _layer(rng, case, limit=64 if path == "avx2" else 127)
    for _ in range(2):  # the second call reuses the bound buffers with new inputs
        out = layer(x, residual, path=path)
        expected = layer.reference(x, residual)
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert np.array_equal(out, expected)
        assert len(np.unique(expected)) > 2  # a layer that does something
        # a strided view this time: the split into phases takes its slower numpy route
        wider = rng.integers(0, 256, (*x.shape[:3], 2 * x.shape[3])).astype(np.uint8)
        x = wider[..., :x.shape[3]]
        residual = None if residual is None else rng.normal(size=residual.shape).astype(
            np.float32)


def test_kernel_choice_is_reported_and_can_be_forced(monkeypatch):
    paths = int8.supported_paths()
    assert int8.kernel_name() == f"cpp-{paths[-1]}"
    monkeypatch.setenv(int8.FORCE_ENV, "portable")
    assert int8.kernel_name() == "cpp-portable"
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        int8.kernel_name("sse9")
    missing = [p for p in int8.PATHS if p not in paths]
    if missing:
        with pytest.raises(ValueError, match="cannot run"):
            int8.kernel_name(missing[0])


@pytest.mark.skipif("avx2" not in int8.supported_paths(), reason="no AVX2")
def test_avx2_path_refuses_weights_that_would_saturate():
    rng = np.random.default_rng(1)
    _, layer, x, _ = _layer(rng, CASES[0], limit=127)
    assert not layer.narrow
    with pytest.raises(ValueError, match="saturates"):
        layer(x, path="avx2")
    assert int8._choose(None, narrow=False) != "avx2"  # never chosen for such weights


def _qdq_conv(w, scale_w, bias, stride, pad, s_in, zp_in, s_out, zp_out) -> onnx.ModelProto:
    """DQ(x) -> Conv(DQ(w per channel), bias) -> [Q -> DQ], the quantizer's QDQ pattern."""
    o = w.shape[0]
    inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(scale_w, "ws"),
             numpy_helper.from_array(np.zeros(o, np.int8), "wz"),
             numpy_helper.from_array(np.float32(s_in), "xs"),
             numpy_helper.from_array(np.uint8(zp_in), "xz"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "b"], ["y"], strides=[stride] * 2,
                              pads=[pad] * 4)]
    out = "y"
    if s_out is not None:
        inits += [numpy_helper.from_array(np.float32(s_out), "ys"),
                  numpy_helper.from_array(np.uint8(zp_out), "yz")]
        nodes.append(helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]))
        out = "yq"
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info(out, TensorProto.UINT8 if s_out else TensorProto.FLOAT,
                                       None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("quantized", [True, False])
def test_reference_is_onnx_runtimes_int8_math(tmp_path, quantized):
    rng = np.random.default_rng(7)
    o, c, k, n, h = 32, 24, 3, 4, 8
    w = rng.integers(-127, 128, (o, c, k, k)).astype(np.int8)
    w[rng.random(w.shape) > 0.1] = 0
    scale_w = (rng.random(o) * 0.004 + 1e-3).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    s_in, zp_in = 0.0123, 37
    s_out, zp_out = (0.031, 5) if quantized else (None, None)
    path = tmp_path / "conv.onnx"
    onnx.save(_qdq_conv(w, scale_w, bias, 1, 1, s_in, zp_in, s_out, zp_out), str(path))
    x = rng.integers(0, 256, (n, c, h, h)).astype(np.uint8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"x": x})[0]
    m = scipy.sparse.csr_array(w.reshape(o, -1).astype(np.int32))
    layer = int8.Int8SparseConv(w.shape, 1, 1, m.indptr, m.indices, m.data.astype(np.int8),
                                scale_w, bias, s_in, zp_in, False, s_out, zp_out)
    ours = layer(np.ascontiguousarray(x.transpose(1, 2, 3, 0))).transpose(3, 0, 1, 2)
    drift = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
    if quantized:  # float rounding order may move a value across a rounding boundary
        assert drift.max() <= 1 and (drift == 0).mean() > 0.99
    else:
        assert drift.max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_two_threads_give_the_same_bytes():
    rng = np.random.default_rng(3)
    case = (64, 32, 3, 1, 1, 8, 16, True, True, True)  # enough work to start a second thread
    _, layer, x, residual = _layer(rng, case)
    assert np.array_equal(layer(x, residual, threads=2), layer.reference(x, residual))


@pytest.mark.parametrize("batch", [1, 16])
def test_table_add_reads_strided_layer_outputs_as_numpy_does(batch, monkeypatch):
    """The residual join's lookup: a layer's output arrives as a view with garbage columns cut
    off (its last axis contiguous); the library reads it in place, numpy gives the same bytes."""
    rng = np.random.default_rng(batch)
    a = rng.integers(0, 256, (8, 5, 7, batch), dtype=np.uint8)[:, :, :6]  # a strided view
    b = rng.integers(0, 256, (8, 5, 6, batch), dtype=np.uint8)
    table = rng.integers(0, 256, 65536).astype(np.uint8)
    want = table[(a.astype(np.int64) << 8) | b]
    assert np.array_equal(int8.table_add(a, b, table), want)
    assert np.array_equal(int8.table_add(np.ascontiguousarray(a), b, table), want)
    monkeypatch.setattr(int8, "_LIB", None)  # the numpy fallback
    assert np.array_equal(int8.table_add(a, b, table), want)
    with pytest.raises(ValueError, match="one shape"):
        int8.table_add(a, b[:, :, :5], table)
