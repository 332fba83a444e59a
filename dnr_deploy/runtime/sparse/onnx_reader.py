"""`GraphReader`: the nodes of an ONNX CNN as sparse-engine steps (key, callable, inputs).

A step's key is the ONNX name of the value it makes; None stands for the graph's input.
Tensors are batch-last (`onnx_ops`); `rank` tracks each one's rank in the graph's layout, which
axis attributes and constants are translated with.
"""

from __future__ import annotations

import numpy as np
import onnx

from dnr_deploy.runtime.sparse import onnx_ops as ops
from dnr_deploy.runtime.sparse.model import ChannelNormalize
from dnr_deploy.runtime.sparse.plan import SparseConv, UnsupportedLayerError, native
from dnr_deploy.runtime.sparse.pooling import GlobalAvgPool, MaxPool

UNARY = {"Relu": lambda n: ops.relu, "Sigmoid": lambda n: ops.sigmoid,
         "HardSwish": lambda n: ops.hard_swish,
         "HardSigmoid": lambda n: ops.hard_sigmoid(attr(n, "alpha", 0.2), attr(n, "beta", 0.5))}
PASS_THROUGH = ("Identity", "Dropout")


class LinearStep:
    """Gemm / MatMul with a constant weight: a 1x1 SparseConv on (features, 1, 1, N)."""

    takes_threads = True

    def __init__(self, conv: SparseConv) -> None:
        self.conv = conv

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        out = self.conv(x.reshape(x.shape[0], 1, 1, x.shape[-1]), threads=threads)
        return out.reshape(out.shape[0], out.shape[-1])


def attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _pairs(node: onnx.NodeProto, name: str, default: int, count: int = 2) -> list[int]:
    value = [int(v) for v in attr(node, name, [default] * count)]
    if len(value) != count:
        raise UnsupportedLayerError(f"{node.op_type} {node.name!r}: {name} {value} is not 2-D; "
                                    "the sparse engine runs 2-D CNNs; use --runtime ort")
    return value


def _per_channel(value: np.ndarray, chans: int) -> bool:
    """Whether a constant broadcasts over an NCHW tensor as one number per channel."""
    return value.size == 1 or (value.ndim >= 3 and value.shape[-3] == chans == value.size)


class GraphReader:
    """One pass over the nodes; Conv chains are fused as the module docstring of onnx_graph
    says, and emitted where the chain ends (after any residual it adds was computed)."""

    def __init__(self, graph: onnx.GraphProto, constants: dict, dense_threshold: float,
                 in_chans: int) -> None:
        if len(graph.input) - len([i for i in graph.input if i.name in constants]) != 1 or \
                len(graph.output) != 1:
            raise UnsupportedLayerError("the sparse engine runs graphs of one input and one "
                                        "output; use --runtime ort")
        self.graph, self.consts, self.threshold = graph, constants, dense_threshold
        self.in_chans = in_chans
        self.input = next(i.name for i in graph.input if i.name not in constants)
        self.output = graph.output[0].name
        self.rank: dict = {None: 4}
        self.alias: dict[str, str] = {}
        self.users: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.users.setdefault(self.output, []).append(None)  # the graph's output: a reader
        self.steps: list = []
        self.fused: set[int] = set()
        self.pending: dict[str, tuple] = {}

    def key(self, name: str) -> str | None:
        name = self.alias.get(name, name)
        if name == self.input:
            return None
        if name not in self.rank:
            raise UnsupportedLayerError(f"the sparse engine cannot compute {name!r} (an op on "
                                        "constants only, or an unknown input); use --runtime ort")
        return name

    def emit(self, out: str, step, inputs: list, rank: int) -> None:
        self.steps.append((out, step, [self.key(i) for i in inputs]))
        self.rank[out] = rank

    def read(self) -> list:
        for node in self.graph.node:
            if id(node) in self.fused:
                if node.output[0] in self.pending:
                    out, step, inputs = self.pending.pop(node.output[0])
                    self.steps.append((out, step, [self.key(i) for i in inputs]))
                continue
            self.node(node)
        output = self.alias.get(self.output, self.output)
        if output == self.input or output not in self.rank:
            raise UnsupportedLayerError(f"the graph's output {self.output!r} is not computed")
        self.output = output
        return self.steps

    def node(self, node: onnx.NodeProto) -> None:
        op, out = node.op_type, (node.output[0] if node.output else "")
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedLayerError(f"the sparse engine has no step for {node.domain}::{op}")
        if op == "Constant":
            tensor = attr(node, "value")
            if not isinstance(tensor, onnx.TensorProto):
                raise UnsupportedLayerError(f"Constant {node.name!r} without a tensor value")
            from dnr_deploy.runtime.sparse.onnx_graph import _tensor

            self.consts[out] = _tensor(tensor, "constant")
        elif op in PASS_THROUGH:
            self.alias[out] = self.alias.get(node.input[0], node.input[0])
        elif op == "Conv":
            self.conv(node)
        elif op in ("Gemm", "MatMul"):
            self.linear(node)
        elif op in UNARY:
            self.emit(out, UNARY[op](node), [node.input[0]], self.rank_of(node.input[0]))
        elif op == "Clip":
            low, high = self.clip_bounds(node)
            self.emit(out, ops.clip(low, high), [node.input[0]], self.rank_of(node.input[0]))
        elif op in ops.BINARY:
            self.binary(node)
        elif op in ("MaxPool", "AveragePool"):
            self.pool(node)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            self.require_rank(node, 4)
            step = GlobalAvgPool() if op == "GlobalAveragePool" else ops.global_max
            self.emit(out, step, [node.input[0]], 4)
        elif op == "ReduceMean":
            self.reduce_mean(node)
        elif op in ("Flatten", "Reshape"):
            self.reshape(node)
        elif op == "Transpose":
            perm = [int(p) for p in attr(node, "perm", [])]
            if not perm or perm[0] != 0:
                raise UnsupportedLayerError(f"Transpose {node.name!r} moves the batch axis "
                                            f"(perm {perm}); use --runtime ort")
            self.emit(out, ops.transpose(perm), [node.input[0]], len(perm))
        elif op == "Concat":
            rank = self.rank_of(node.input[0])
            axis = ops.feature_axis(int(attr(node, "axis")), rank, "Concat")
            self.emit(out, ops.concat(axis), list(node.input), rank)
        elif op == "Split":
            self.split(node)
        elif op == "BatchNormalization":
            scale, shift = self.norm_affine(node)
            self.require_rank(node, 4)
            self.emit(out, ops.channel_affine(scale, shift), [node.input[0]], 4)
        else:
            raise UnsupportedLayerError(
                f"the sparse engine has no step for ONNX op {op} (node {node.name!r}); it runs "
                "CNNs (Conv, Gemm/MatMul, pools, activations, Add/Mul, Concat, Split, "
                "Reshape/Flatten/Transpose, ReduceMean, BatchNormalization); use --runtime ort")

    # helpers ----------------------------------------------------------------------------

    def rank_of(self, name: str) -> int:
        return self.rank[self.key(name)]

    def require_rank(self, node: onnx.NodeProto, rank: int) -> None:
        if self.rank_of(node.input[0]) != rank:
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r} on a tensor of rank "
                                        f"{self.rank_of(node.input[0])}; use --runtime ort")

    def const(self, node: onnx.NodeProto, index: int, default=None) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return default
        name = node.input[index]
        if name not in self.consts:
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r}: input {name!r} must be "
                                        "a constant for the sparse engine; use --runtime ort")
        return self.consts[name]

    def only_user(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`, unless another chain took it (both inputs of an
        addition can come from convs) or the graph outputs it."""
        users = self.users.get(name, [])
        single = len(users) == 1 and users[0] is not None and id(users[0]) not in self.fused
        return users[0] if single else None

    def norm_affine(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (self.const(node, i).astype(np.float64) for i in range(1, 5))
        scale = gamma / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
        return scale, beta - mean * scale

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float | None, float | None]:
        low, high = self.const(node, 1), self.const(node, 2)
        low = attr(node, "min") if low is None else float(low)
        high = attr(node, "max") if high is None else float(high)
        return low, high

    # op builders --------------------------------------------------------------------------

    def conv(self, node: onnx.NodeProto) -> None:
        weight = self.const(node, 1).astype(np.float64)
        if weight.ndim != 4:
            raise UnsupportedLayerError(f"Conv {node.name!r} is not 2-D; use --runtime ort")
        bias = self.const(node, 2, np.zeros(weight.shape[0])).astype(np.float64)
        strides, dilations = _pairs(node, "strides", 1), _pairs(node, "dilations", 1)
        pads = _pairs(node, "pads", 0, 4)
        if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or \
                strides[0] != strides[1] or dilations[0] != dilations[1]:
            raise UnsupportedLayerError(
                f"Conv {node.name!r}: the sparse engine runs equal strides and dilations and "
                f"explicit padding (got strides {strides}, dilations {dilations}, auto_pad "
                f"{attr(node, 'auto_pad')}); use --runtime ort")
        last, residual, relu = node, None, False
        user = self.only_user(node.output[0])
        if user is not None and user.op_type == "BatchNormalization" and \
                all(name in self.consts for name in user.input[1:5]):
            scale, shift = self.norm_affine(user)
            weight = weight * scale[:, None, None, None]
            bias = bias * scale + shift
            last, user = user, self.only_user(user.output[0])
        if user is not None and user.op_type == "Add" and len(set(user.input)) == 2:
            other = next(name for name in user.input if name != last.output[0])
            if other not in self.consts:
                last, residual, user = user, other, self.only_user(user.output[0])
        if user is not None and user.op_type == "Relu":
            last, relu = user, True
        groups = int(attr(node, "group", 1))
        conv = SparseConv(weight.astype(np.float32), bias.astype(np.float32), strides[0],
                          tuple(pads), relu, self.threshold, dilations[0], groups)
        self.fuse(node, last, conv, [node.input[0]] + ([residual] if residual else []))

    def fuse(self, first: onnx.NodeProto, last: onnx.NodeProto, step, inputs: list) -> None:
        """Emit `step` for the chain first..last now, or where its last node stands."""
        out = last.output[0]
        node = first
        while node is not last:
            node = self.only_user(node.output[0])
            self.fused.add(id(node))
        if last is first:
            self.emit(out, step, inputs, 4 if isinstance(step, SparseConv) else 2)
        else:  # keys resolved now: a residual's producer may come later, it has a rank then
            self.rank[out] = 4 if isinstance(step, SparseConv) else 2
            self.pending[out] = (out, step, inputs)

    def linear(self, node: onnx.NodeProto) -> None:
        if self.rank_of(node.input[0]) != 2 or node.input[1] not in self.consts:
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r}: the sparse engine runs "
                                        "a (batch, features) input times a constant weight")
        weight = self.const(node, 1).astype(np.float64)
        bias = np.zeros(weight.shape[1] if node.op_type == "MatMul" else 1)
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                raise UnsupportedLayerError(f"Gemm {node.name!r} with transA; use --runtime ort")
            weight = weight if attr(node, "transB", 0) else weight.T
            weight = weight * float(attr(node, "alpha", 1.0))
            bias = self.const(node, 2, np.zeros(1)).astype(np.float64) * \
                float(attr(node, "beta", 1.0))
        else:
            weight = weight.T
        if weight.ndim != 2:
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r}: weight not 2-D")
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],))
        last, relu = node, False
        user = self.only_user(node.output[0])
        if user is not None and user.op_type == "Relu":
            last, relu = user, True
        conv = SparseConv(weight.reshape(*weight.shape, 1, 1).astype(np.float32),
                          bias.astype(np.float32), 1, 0, relu, self.threshold)
        self.fuse(node, last, LinearStep(conv), [node.input[0]])

    def binary(self, node: onnx.NodeProto) -> None:
        a, b = node.input[:2]
        func = ops.BINARY[node.op_type]
        if node.op_type == "Sub" and b in self.consts and self.alias.get(a, a) == self.input \
                and self.normalization(node):
            return
        if a in self.consts and b in self.consts:
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r} on constants only")
        if a in self.consts or b in self.consts:
            runtime, const = (b, a) if a in self.consts else (a, b)
            rank = self.rank_of(runtime)
            value = ops.batch_last_constant(self.consts[const], rank)
            step = (lambda x: func(value, x)) if a in self.consts else (lambda x: func(x, value))
            self.emit(node.output[0], step, [runtime], rank)
        else:
            self.emit(node.output[0], func, [a, b], max(self.rank_of(a), self.rank_of(b)))

    def normalization(self, sub: onnx.NodeProto) -> bool:
        """Whether Sub(input, mean) -> Div(std), both per channel, was emitted as one
        ChannelNormalize (which the first conv then takes over)."""
        div = self.only_user(sub.output[0])
        if div is None or div.op_type != "Div" or div.input[0] != sub.output[0] or \
                div.input[1] not in self.consts:
            return False
        mean, std = self.consts[sub.input[1]], self.consts[div.input[1]]
        if not (_per_channel(mean, self.in_chans) and _per_channel(std, self.in_chans)):
            return False
        step = ChannelNormalize(np.broadcast_to(mean.reshape(-1), (self.in_chans,)),
                                np.broadcast_to(std.reshape(-1), (self.in_chans,)))
        self.fused.add(id(div))
        self.emit(div.output[0], step, [sub.input[0]], 4)
        return True

    def pool(self, node: onnx.NodeProto) -> None:
        self.require_rank(node, 4)
        if len([o for o in node.output if o]) > 1:
            raise UnsupportedLayerError(f"MaxPool {node.name!r} with indices; use --runtime ort")
        kernel = _pairs(node, "kernel_shape", 1)
        strides, pads = _pairs(node, "strides", 1), _pairs(node, "pads", 0, 4)
        dilations, ceil = _pairs(node, "dilations", 1), bool(attr(node, "ceil_mode", 0))
        if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise UnsupportedLayerError(f"{node.op_type} {node.name!r} with auto_pad; "
                                        "use --runtime ort")
        plain = kernel[0] == kernel[1] == strides[0] == strides[1] and not any(pads) and \
            dilations == [1, 1] and not ceil
        if node.op_type == "MaxPool" and plain and native.available:
            step = MaxPool(kernel[0])
        else:
            kind = "max" if node.op_type == "MaxPool" else "avg"
            step = ops.WindowPool(kind, tuple(kernel), tuple(strides), tuple(pads),
                                  tuple(dilations), ceil, bool(attr(node, "count_include_pad", 0)))
        self.emit(node.output[0], step, [node.input[0]], 4)

    def reduce_mean(self, node: onnx.NodeProto) -> None:
        rank = self.rank_of(node.input[0])
        axes = self.const(node, 1)
        axes = attr(node, "axes") if axes is None else axes.reshape(-1).tolist()
        keep = bool(attr(node, "keepdims", 1))
        if not axes:
            raise UnsupportedLayerError(f"ReduceMean {node.name!r} over every axis")
        local = tuple(sorted(ops.feature_axis(int(a), rank, "ReduceMean") for a in axes))
        step = GlobalAvgPool() if rank == 4 and local == (1, 2) and keep \
            else ops.mean(local, keep)
        self.emit(node.output[0], step, [node.input[0]], rank if keep else rank - len(local))

    def reshape(self, node: onnx.NodeProto) -> None:
        rank = self.rank_of(node.input[0])
        if node.op_type == "Flatten":
            if ops.feature_axis(int(attr(node, "axis", 1)), rank, "Flatten") != 0:
                raise UnsupportedLayerError(f"Flatten {node.name!r} keeps more than the batch")
            self.emit(node.output[0], ops.reshape((-1,)), [node.input[0]], 2)
            return
        target = [int(t) for t in self.const(node, 1).reshape(-1)]
        zero_is_copy = not attr(node, "allowzero", 0)
        if not target or target[0] not in (-1, 0) or (target[0] == 0 and not zero_is_copy) or \
                (target[0] == -1 and -1 in target[1:]) or (0 in target[1:] and not zero_is_copy):
            raise UnsupportedLayerError(f"Reshape {node.name!r} to {target} would change the "
                                        "batch; use --runtime ort")
        self.emit(node.output[0], ops.reshape(tuple(target[1:])), [node.input[0]], len(target))

    def split(self, node: onnx.NodeProto) -> None:
        rank = self.rank_of(node.input[0])
        axis = ops.feature_axis(int(attr(node, "axis", 0)), rank, "Split")
        sizes = self.const(node, 1)
        sizes = attr(node, "split") if sizes is None else sizes.reshape(-1).tolist()
        outputs = list(node.output)
        if not sizes:  # opset 18's num_outputs, or none: equal parts (the last one smaller)
            for index, name in enumerate(outputs):
                self.emit(name, ops.take_part(axis, index, len(outputs)), [node.input[0]], rank)
            return
        start = 0
        for name, size in zip(outputs, sizes, strict=True):
            self.emit(name, ops.take_slice(axis, start, start + int(size)), [node.input[0]], rank)
            start += int(size)

