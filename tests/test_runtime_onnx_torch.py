"""The ONNX->torch interpreter: equal to ONNX Runtime on the exporter's graphs of every model
(channel-shrunk and with sparse initializers), differentiable like the original network, and
loud about ops it does not know."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dnr_deploy.export.onnx import export_onnx, sparsify_initializers
from dnr_deploy.models import create_model
from dnr_deploy.runtime.onnx_torch import (
    OPS,
    OnnxTorch,
    UnsupportedGraphError,
    load_onnx_torch,
    sparse_to_dense,
)
from dnr_deploy.runtime.session import create_session, run_logits

SHAPES = {"small": (1, 8, 8), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32)}


def shrunk_model(name: str) -> nn.Module:
    """`name` with a third of every other conv's output channels removed by torch-pruning
    (residual ties included): the odd shapes a channel run deploys. BN statistics are measured
    on random inputs after pruning, as training would leave them: with the default statistics
    deep activations shrink until a channel's bias dominates them, pooling windows hold near-ties
    and float32 rounding alone flips which pixel gets the gradient."""
    torch.manual_seed(0)
    chans = SHAPES[name][0]
    model = create_model(name, 10, chans, [0.4] * chans, [0.3] * chans)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    graph = tp.DependencyGraph().build_dependency(model, torch.zeros(1, *SHAPES[name]))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs[:-1:2]:
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels,
                                        idxs=list(range(0, conv.out_channels, 3)))
        if graph.check_pruning_group(group):
            group.prune()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(64, *SHAPES[name], generator=torch.Generator().manual_seed(5)))
    return model.eval()


def sparse_copy(path: Path, out: Path, density: float = 0.1) -> int:
    """`path` with 90% of every conv/linear weight zeroed, stored as ONNX sparse initializers
    by the exporter's own function (what an irregular export writes)."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    names = set()
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim in (2, 4) and array.size > 64:
            array = array * (rng.random(array.shape) < density)
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
            names.add(init.name)
    onnx.save(model, str(out))
    return sparsify_initializers(out, names)["sparse"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Lazily exported graphs, one per model, shared by the tests of this module."""
    cache: dict = {}

    def get(name: str) -> tuple[nn.Module, Path, Path]:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = shrunk_model(name)
            export_onnx(model, torch.zeros(1, *SHAPES[name]), folder / "model.onnx", 18)
            assert sparse_copy(folder / "model.onnx", folder / "sparse.onnx") > 0
            cache[name] = (model, folder / "model.onnx", folder / "sparse.onnx")
        return cache[name]

    return get


def input_gradient(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d/dx of a fixed random projection of the logits (no softmax: nothing cancels by design)."""
    weights = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((net(xr) * weights).sum(), xr)
    return grad


def check_against_ort(path: Path, shape: tuple[int, ...]) -> OnnxTorch:
    graph = load_onnx_torch(str(path))
    session, _ = create_session(path)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = graph(x).numpy()
    theirs = run_logits(session, x.numpy())
    # float32 logits from two runtimes' kernels: equal to rounding, relative to their size
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * float(np.abs(theirs).max()), rtol=0)
    return graph


@pytest.mark.parametrize("name", [
    "small", pytest.param("vgg16", marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param("resnet18", marks=[pytest.mark.slow, pytest.mark.ci])])
def test_reimport_equals_ort_and_torch_with_the_same_input_gradient(name, exports):
    model, dense_path, sparse_path = exports(name)
    graph = check_against_ort(dense_path, SHAPES[name])
    check_against_ort(sparse_path, SHAPES[name])
    assert len(onnx.load(str(sparse_path)).graph.sparse_initializer) > 0

    x = torch.rand(3, *SHAPES[name], generator=torch.Generator().manual_seed(2))
    # The float64 gradient of the original network is the truth. The re-import computes the
    # same function in float32 through another order of ops (BN folded into the convs by the
    # exporter), so it may differ from the truth by float32 rounding accumulated over the
    # depth: measured 7e-7 of the gradient's norm on these nets (AVX2), as far as the float32
    # original is. The bound allows 30x that; a wrong gradient (a
    # layer, a ReLU mask or a pooling switch missed) is off by the order of the gradient itself.
    truth = input_gradient(copy.deepcopy(model).double(), x.double())
    original = input_gradient(model, x).double()
    reimported = input_gradient(graph, x).double()
    assert truth.norm() > 0

    def relative_error(grad: torch.Tensor) -> float:
        return float((grad - truth).norm() / truth.norm())

    assert relative_error(original) < 2e-5  # the bound is one float32 can keep
    assert relative_error(reimported) < 2e-5, (
        f"re-import's gradient is {relative_error(reimported):.3g} of its norm from float64, "
        f"the float32 original's {relative_error(original):.3g}")
    cosine = torch.nn.functional.cosine_similarity(reimported.flatten(), truth.flatten(), dim=0)
    assert cosine > 0.999
    assert not list(graph.parameters())  # weights are buffers: attacks move inputs only


def test_dynamic_batch_and_eval_mode(exports):
    _, path, _ = exports("small")
    graph = load_onnx_torch(str(path))
    assert not graph.training
    for batch in (1, 7):
        assert graph(torch.rand(batch, 1, 8, 8)).shape == (batch, 10)


def hand_graph(nodes, initializers, in_shape, out_shape=("batch", 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what ONNX Runtime 1.18 (the oldest allowed) reads
    return model


def test_every_supported_op_matches_ort(tmp_path):
    """The ops the exporter may emit beyond today's graphs: asymmetric pads, BatchNorm, average
    pools, Flatten, MatMul, Mul, Identity, Constant, Reshape with 0, Gemm with transA, and the
    activations of torchvision's mobile nets (HardSwish, HardSigmoid, Sigmoid)."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w": f32(4, 2, 3, 3), "b": f32(4), "scale": f32(4), "shift": f32(4),
             "mean": f32(4), "var": np.abs(f32(4)) + 0.5, "k": f32(64, 5),
             "shape": np.array([0, -1], np.int64), "bias": f32(5), "axes": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[0, 1, 1, 0], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1],
                         strides=[1, 1]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(
            np.array(2.0, np.float32))),
        helper.make_node("Mul", ["ap", "two"], ["m"]),
        helper.make_node("Identity", ["m"], ["i"]),
        helper.make_node("Flatten", ["i"], ["f"], axis=1),
        helper.make_node("Reshape", ["f", "shape"], ["rs"]),
        helper.make_node("MatMul", ["rs", "k"], ["mm"]),
        helper.make_node("Gemm", ["mm", "mm"], ["g"], transA=1),  # 5x5 from (N,5)^T (N,5)
        helper.make_node("ReduceMean", ["g", "axes"], ["rm"], keepdims=0),
        helper.make_node("Add", ["mm", "rm"], ["a"]),
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["gf"]),
        helper.make_node("ReduceMean", ["gf"], ["gm"], keepdims=1),
        helper.make_node("Sub", ["a", "gm"], ["s"]),
        helper.make_node("Div", ["s", "two"], ["d"]),
        helper.make_node("HardSwish", ["d"], ["hw"]),
        helper.make_node("Sigmoid", ["d"], ["sg"]),
        helper.make_node("Mul", ["hw", "sg"], ["hm"]),
        helper.make_node("HardSigmoid", ["d"], ["hg"], alpha=0.3, beta=0.4),
        helper.make_node("Add", ["hm", "hg"], ["ha"]),
        helper.make_node("Add", ["ha", "bias"], ["logits"]),
    ]
    model = hand_graph(nodes, inits, [2, 8, 8], ("batch", 5))
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "hand.onnx"
    onnx.save(model, str(path))
    graph = OnnxTorch(model)
    session, _ = create_session(path)
    x = np.random.default_rng(1).random((3, 2, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ours = graph(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, run_logits(session, x), atol=1e-4, rtol=1e-5)


def reimport_matching_ort(model: onnx.ModelProto, x: np.ndarray, path: Path
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks `model`, saves it to `path` and asserts the re-import's logits on `x` equal ONNX
    Runtime's (atol 1e-5); returns the re-import's input (requiring grad) and its logits."""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    ours = torch.from_numpy(x).requires_grad_()
    logits = OnnxTorch(model)(ours)
    session, _ = create_session(path)
    np.testing.assert_allclose(logits.detach().numpy(), run_logits(session, x), atol=1e-5)
    return ours, logits


def test_shuffle_ops_match_ort_in_values_and_gradients(tmp_path):
    """ShuffleNet's channel split and shuffle: Split (by sizes and by num_outputs, uneven),
    Transpose, Reshape and Concat, against ONNX Runtime; and the input gradient flows through
    them as torch's own ops would give it (a wrong permutation moves it to other pixels)."""
    shape = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"sizes": shape(1, 3), "sizes8": shape(1, 7), "grouped": shape(0, 2, 2, 4, 4),
             "flat": shape(0, 4, 4, 4), "out": shape(0, -1),
             "k": np.random.default_rng(0).standard_normal((7 * 4 * 4, 4)).astype(np.float32)}
    nodes = [
        helper.make_node("Split", ["input", "sizes"], ["keep", "rest"], axis=1),
        helper.make_node("Reshape", ["input", "grouped"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "flat"], ["shuffled"]),
        helper.make_node("Split", ["shuffled"], ["a", "b"], axis=3, num_outputs=2),
        helper.make_node("Concat", ["b", "a"], ["rolled"], axis=3),
        helper.make_node("Concat", ["keep", "rest", "rolled"], ["both"], axis=1),
        helper.make_node("Split", ["both", "sizes8"], ["x1", "x7"], axis=1),
        helper.make_node("Concat", ["x7", "x1"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["tt"]),  # default: reverse every axis
        helper.make_node("Transpose", ["tt"], ["back"]),
        helper.make_node("Split", ["back", "sizes8"], ["unused", "used"], axis=1),
        helper.make_node("Reshape", ["used", "out"], ["f"]),
        helper.make_node("MatMul", ["f", "k"], ["logits"]),
    ]
    x = np.random.default_rng(1).random((2, 4, 4, 4), dtype=np.float32)
    ours, logits = reimport_matching_ort(hand_graph(nodes, inits, [4, 4, 4]), x,
                                         tmp_path / "shuffle.onnx")

    def by_hand(t: torch.Tensor) -> torch.Tensor:  # the same graph in torch
        shuffled = t.reshape(2, 2, 2, 4, 4).transpose(1, 2).reshape(2, 4, 4, 4)
        rolled = torch.cat([shuffled[..., 2:], shuffled[..., :2]], dim=3)
        both = torch.cat([t, rolled], dim=1)
        used = torch.cat([both[:, 1:], both[:, :1]], dim=1)[:, 1:]
        return used.reshape(2, -1) @ torch.from_numpy(inits["k"])

    reference = torch.from_numpy(x).requires_grad_()
    by_hand(reference).sum().backward()
    logits.sum().backward()
    assert torch.allclose(ours.grad, reference.grad, atol=1e-5)
    assert ours.grad.abs().sum() > 0
    uneven = OPS["Split"]([torch.arange(5.0)], {"num_outputs": 3})  # ONNX's reference: 2, 2, 1
    assert [len(t) for t in uneven] == [2, 2, 1]


def test_transformer_ops_match_ort_in_values_and_gradients(tmp_path):
    """The shape arithmetic, indexing and normalization Swin exports to: Pad (constant, uneven),
    Slice with a negative step and out-of-range bounds, LayerNormalization, Erf, ReduceL2,
    Unsqueeze, Expand, Squeeze, Gather (tensor and scalar index), Shape, Range, GatherND and
    a Reshape to a computed shape, against ONNX Runtime; the input gradient is finite and
    reaches the input."""
    rng = np.random.default_rng(0)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"pads": i64(0, 0, 1, 0, 0, 0, 0, 1), "half": np.array(0.5, np.float32),
             "starts": i64(4), "ends": i64(-100), "axes3": i64(3), "step": i64(-2),
             "scale": rng.standard_normal(3).astype(np.float32),
             "shift": rng.standard_normal(3).astype(np.float32), "axes2": i64(2),
             "axes1": i64(1), "wide": i64(1, 2, 1, 1), "pick": i64(2, 0, 1, 1).reshape(2, 2),
             "zero": np.array(0, np.int64), "three": np.array(3, np.int64),
             "one": np.array(1, np.int64), "axes0": i64(0), "minus1": i64(-1),
             "table": rng.standard_normal((5, 4)).astype(np.float32),
             "k": rng.standard_normal((24, 4)).astype(np.float32)}
    nodes = [
        helper.make_node("Pad", ["input", "pads", "half"], ["p"]),  # N,3,5,5
        helper.make_node("Slice", ["p", "starts", "ends", "axes3", "step"], ["sl"]),  # N,3,5,3
        helper.make_node("LayerNormalization", ["sl", "scale", "shift"], ["ln"], axis=-1),
        helper.make_node("Erf", ["ln"], ["e"]),
        helper.make_node("ReduceL2", ["e", "axes2"], ["r"], keepdims=0),  # N,3,3
        helper.make_node("Unsqueeze", ["r", "axes1"], ["u"]),  # N,1,3,3
        helper.make_node("Expand", ["u", "wide"], ["ex"]),  # N,2,3,3
        helper.make_node("Squeeze", ["u", "axes1"], ["sq"]),  # N,3,3
        helper.make_node("Unsqueeze", ["sq", "axes1"], ["u2"]),  # N,1,3,3
        helper.make_node("Add", ["ex", "u2"], ["ex2"]),
        helper.make_node("Gather", ["ex2", "pick"], ["g"], axis=3),  # N,2,3,2,2
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),  # scalar N
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["g", "target"], ["flat"]),  # N,24
        helper.make_node("MatMul", ["flat", "k"], ["mm"]),
        helper.make_node("Range", ["zero", "three", "one"], ["rows"]),
        helper.make_node("Unsqueeze", ["rows", "axes1"], ["rows1"]),  # 3,1
        helper.make_node("GatherND", ["table", "rows1"], ["bias"]),  # 3,4
        helper.make_node("ReduceMean", ["bias", "axes0"], ["bias1"], keepdims=0),  # 4
        helper.make_node("Add", ["mm", "bias1"], ["logits"]),
    ]
    x = np.random.default_rng(1).random((2, 3, 4, 4), dtype=np.float32)
    ours, logits = reimport_matching_ort(hand_graph(nodes, inits, [3, 4, 4]), x,
                                         tmp_path / "swin_ops.onnx")
    logits.sum().backward()
    assert torch.isfinite(ours.grad).all() and ours.grad.abs().sum() > 0
    kept = OPS["Slice"]([torch.arange(6.0), torch.tensor([4]), torch.tensor([-100]),
                         torch.tensor([0]), torch.tensor([-2])], {})[0]
    assert kept.tolist() == [4.0, 2.0, 0.0]  # numpy's x[4::-2]


def test_unsupported_op_is_named():
    nodes = [helper.make_node("Einsum", ["input"], ["logits"], equation="bi->bi")]
    with pytest.raises(UnsupportedGraphError, match="Einsum"):
        OnnxTorch(hand_graph(nodes, {}, [4]))
    custom = [helper.make_node("Relu", ["input"], ["logits"], domain="com.example")]
    with pytest.raises(UnsupportedGraphError, match="com.example::Relu"):
        OnnxTorch(hand_graph(custom, {}, [4]))
    same_upper = [helper.make_node("Conv", ["input", "w"], ["logits"], auto_pad="SAME_UPPER")]
    with pytest.raises(UnsupportedGraphError, match="auto_pad"):
        OnnxTorch(hand_graph(same_upper, {"w": np.ones((1, 1, 3, 3), np.float32)}, [1, 4, 4]))


def test_not_onnx_is_a_clear_error(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff\xff")
    with pytest.raises(UnsupportedGraphError, match="cannot parse"):
        load_onnx_torch(str(path))


def test_sparse_tensor_both_index_layouts():
    dense = np.array([[0, 1.5, 0], [2.0, 0, 0]], np.float32)
    values = numpy_helper.from_array(np.array([1.5, 2.0], np.float32), "v")
    flat = numpy_helper.from_array(np.array([1, 3], np.int64), "i")
    coords = numpy_helper.from_array(np.array([[0, 1], [1, 0]], np.int64), "i")
    for indices in (flat, coords):
        sparse = helper.make_sparse_tensor(values, indices, [2, 3])
        np.testing.assert_array_equal(sparse_to_dense(sparse), dense)
