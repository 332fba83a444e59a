"""The sparse engine's ONNX front end, op by op, against ONNX Runtime on small graphs built with
onnx.helper (no torch): convs of every stride, padding, dilation and group count, the fusions,
Gemm / MatMul, pools, activations, squeeze-excitation, shape ops, and the one-line refusal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from dnr_deploy.runtime.sparse import UnsupportedLayerError, build_from_onnx, native

CHANS, SIZE = 8, 9


class Graph:
    """A graph under construction: nodes appended in order, constants as initializers."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def const(self, value: np.ndarray, dtype=np.float32) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        self.count += 1
        names = [f"v{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"n{self.count}",
                                           **attrs))
        return names

    def conv(self, x: str, out_chans: int, in_chans: int, kernel: int = 3, density: float = 0.3,
             **attrs) -> str:
        groups = attrs.get("group", 1)
        weight = self.rng.standard_normal((out_chans, in_chans // groups, kernel, kernel))
        weight *= self.rng.random(weight.shape) < density
        bias = self.rng.standard_normal(out_chans)
        return self.op("Conv", [x, self.const(weight), self.const(bias)],
                       kernel_shape=[kernel, kernel], **attrs)[0]

    def batch_norm(self, x: str, chans: int) -> str:
        gamma, beta, mean = (self.rng.standard_normal(chans) for _ in range(3))
        var = self.rng.random(chans) + 0.5
        return self.op("BatchNormalization", [x, *(self.const(v) for v in (gamma, beta, mean,
                                                                          var))])[0]

    def model(self, last: str, chans: int = CHANS) -> onnx.ModelProto:
        flat = self.op("Flatten", [last])[0]
        self.nodes.append(helper.make_node("Identity", [flat], ["logits"]))
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                            ["N", chans, SIZE, SIZE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "F"])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def assert_matches_ort(model: onnx.ModelProto, batch: int = 3, chans: int = CHANS) -> None:
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).random((batch, chans, SIZE, SIZE), dtype=np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    got = build_from_onnx(model, [chans, SIZE, SIZE])(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attrs", [
    dict(strides=[1, 1], pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(strides=[3, 3], pads=[0, 0, 0, 0]),
    dict(strides=[1, 1], pads=[0, 1, 2, 1]),  # asymmetric
    dict(strides=[1, 1], pads=[2, 2, 2, 2], dilations=[2, 2]),
    dict(strides=[2, 2], pads=[2, 2, 2, 2], dilations=[2, 2]),
    dict(strides=[1, 1], pads=[1, 1, 1, 1], group=2),
    dict(strides=[2, 2], pads=[1, 1, 1, 1], group=CHANS),  # depthwise
])
def test_conv_geometries(attrs):
    g = Graph()
    out_chans = CHANS if attrs.get("group", 1) == CHANS else 6
    y = g.conv("input", out_chans, CHANS, **attrs)
    assert_matches_ort(g.model(y))


def test_conv_batch_norm_residual_relu_fuse_into_one_step():
    g = Graph()
    a = g.op("Relu", [g.batch_norm(g.conv("input", CHANS, CHANS, pads=[1] * 4), CHANS)])[0]
    b = g.batch_norm(g.conv(a, CHANS, CHANS, pads=[1] * 4), CHANS)
    y = g.op("Relu", [g.op("Add", [b, a])[0]])[0]
    model = g.model(y)
    assert_matches_ort(model)
    steps = build_from_onnx(model, [CHANS, SIZE, SIZE]).steps
    assert [type(step).__name__ for _, step, _ in steps][:2] == ["SparseConv", "SparseConv"]
    assert steps[1][1].relu and len(steps[1][2]) == 2  # the addition's input, in the epilogue


def test_projection_shortcut_two_convs_into_one_addition():
    g = Graph()
    a = g.op("Relu", [g.conv("input", CHANS, CHANS, pads=[1] * 4)])[0]
    main = g.conv(g.op("Relu", [g.conv(a, 6, CHANS, pads=[1] * 4, strides=[2, 2])])[0], 6, 6,
                  pads=[1] * 4)
    shortcut = g.conv(a, 6, CHANS, 1, strides=[2, 2])  # after the main branch, as exported
    y = g.op("Relu", [g.op("Add", [main, shortcut])[0]])[0]
    assert_matches_ort(g.model(y), batch=8)


@pytest.mark.parametrize("batch", [1, 3, 8, 17])  # chunks of 4 or 8 images, and a remainder
def test_normalized_vgg_like_net_with_gemm_head(batch):
    g = Graph()
    x = g.op("Div", [g.op("Sub", ["input", g.const(g.rng.random((1, CHANS, 1, 1)))])[0],
                     g.const(g.rng.random((1, CHANS, 1, 1)) + 0.5)])[0]
    x = g.op("Relu", [g.conv(x, 16, CHANS, pads=[1] * 4)])[0]
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])[0]
    x = g.op("ReduceMean", [x, g.const([2, 3], np.int64)], keepdims=1)[0]
    x = g.op("Reshape", [x, g.const([-1, 16], np.int64)])[0]
    weight = g.rng.standard_normal((10, 16)) * (g.rng.random((10, 16)) < 0.5)
    x = g.op("Gemm", [x, g.const(weight), g.const(g.rng.standard_normal(10))], transB=1)[0]
    assert_matches_ort(g.model(x), batch=batch)


def test_matmul_and_gemm_variants():
    g = Graph()
    x = g.op("Flatten", [g.op("GlobalAveragePool", ["input"])[0]])[0]
    x = g.op("MatMul", [x, g.const(g.rng.standard_normal((CHANS, 12)))])[0]
    x = g.op("Relu", [x])[0]
    x = g.op("Gemm", [x, g.const(g.rng.standard_normal((12, 5))),
                      g.const(g.rng.standard_normal((1, 5)))], alpha=0.5, beta=2.0)[0]
    assert_matches_ort(g.model(x))


@pytest.mark.parametrize("op,attrs,extra", [
    ("Relu", {}, []), ("Sigmoid", {}, []), ("HardSwish", {}, []),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, []), ("Clip", {}, [0.0, 6.0]),
])
def test_activations(op, attrs, extra):
    g = Graph()
    x = g.conv("input", CHANS, CHANS, pads=[1] * 4)
    inputs = [x, *(g.const(np.float32(v)) for v in extra)]
    assert_matches_ort(g.model(g.op(op, inputs, **attrs)[0]))


def test_squeeze_excitation_concat_split_and_channel_shuffle():
    g = Graph()
    x = g.conv("input", CHANS, CHANS, pads=[1] * 4)
    squeeze = g.op("GlobalAveragePool", [x])[0]
    scale = g.op("HardSigmoid", [g.conv(g.op("Relu", [g.conv(squeeze, 4, CHANS, 1)])[0],
                                        CHANS, 4, 1)])[0]
    x = g.op("Mul", [x, scale])[0]
    left, right = g.op("Split", [x, g.const([3, 5], np.int64)], outputs=2, axis=1)
    half, other = g.op("Split", [x], outputs=2, axis=1, num_outputs=2)
    x = g.op("Add", [g.op("Concat", [half, other], axis=1)[0], x])[0]
    x = g.op("Concat", [right, g.op("Sigmoid", [left])[0]], axis=1)[0]
    x = g.op("Reshape", [x, g.const([0, 2, 4, SIZE, SIZE], np.int64)])[0]
    x = g.op("Transpose", [x], perm=[0, 2, 1, 3, 4])[0]
    x = g.op("Reshape", [x, g.const([0, CHANS, SIZE, SIZE], np.int64)])[0]
    x = g.op("Add", [x, g.const(g.rng.standard_normal((CHANS, 1, 1)))])[0]
    assert_matches_ort(g.model(x))


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                         count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("GlobalMaxPool", {}),
])
def test_pools(op, attrs):
    g = Graph()
    x = g.conv("input", CHANS, CHANS, pads=[1] * 4)
    assert_matches_ort(g.model(g.op(op, [x], **attrs)[0]))


def test_reduce_mean_without_keepdims_and_a_lone_batch_norm():
    g = Graph()
    x = g.batch_norm(g.op("Relu", ["input"])[0], CHANS)
    x = g.op("ReduceMean", [x, g.const([2, 3], np.int64)], keepdims=0)[0]
    assert_matches_ort(g.model(x))


def test_ops_without_a_step_are_refused_in_one_line():
    g = Graph()
    x = g.op("Softmax", [g.conv("input", CHANS, CHANS, pads=[1] * 4)], axis=1)[0]
    with pytest.raises(UnsupportedLayerError, match="no step for ONNX op Softmax") as err:
        build_from_onnx(g.model(x), [CHANS, SIZE, SIZE])
    assert "\n" not in str(err.value) and "--runtime ort" in str(err.value)


@pytest.mark.skipif(not native.available, reason="the compiled kernel is not built")
def test_numba_fallback_runs_the_same_graph(monkeypatch):
    monkeypatch.setattr(native, "available", False)
    g = Graph()
    x = g.op("Relu", [g.conv("input", CHANS, CHANS, pads=[1] * 4, strides=[2, 2], group=2)])[0]
    assert_matches_ort(g.model(g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])[0]))


def test_threads_pick_a_split_per_batch_size_and_agree_with_one_thread():
    g = Graph()
    x = g.op("Relu", [g.conv("input", 16, CHANS, pads=[1] * 4)])[0]
    x = g.op("Relu", [g.conv(x, 16, 16, pads=[1] * 4, strides=[2, 2])])[0]
    model = g.model(g.op("GlobalAveragePool", [x])[0])
    one, two = (build_from_onnx(model, [CHANS, SIZE, SIZE], threads=t) for t in (1, 2))
    x = np.random.default_rng(2).random((19, CHANS, SIZE, SIZE), dtype=np.float32)
    # handing chunks to threads may cut the batch in smaller chunks (8 instead of 16 with
    # generated code), which rounds differently; the same chunks agree exactly
    np.testing.assert_allclose(two(x), one(x), rtol=1e-5, atol=1e-5)
    assert set(two._splits.values()) <= {"layers", "images", "none"} and two._splits
    want = one(x)
    for split in ("layers", "none"):
        np.testing.assert_array_equal(np.concatenate(two._run(x, split)), want)
    np.testing.assert_allclose(np.concatenate(two._run(x, "images")), want, rtol=1e-5,
                               atol=1e-5)
