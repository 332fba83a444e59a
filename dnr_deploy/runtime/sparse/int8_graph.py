"""An irregular int8 deploy dir run through the int8 sparse kernels: model.onnx's QDQ graph
with every quantized Conv and Gemm replaced by `Int8SparseConv` on weights.int8.npz.

This is a function-level runner, not the float engine's planned graph: it walks the graph node
by node in numpy and hands each quantized Conv / Gemm its uint8 input, fusing the
QuantizeLinear that follows into the kernel's epilogue. Every 4-D activation stays in the
kernels' CHWN layout (batch innermost), so no layer transposes its input or output; an op that
needs NCHW (Reshape, Flatten, a ReduceMean that drops axes) gets it at that op.

What it is for: `--runtime sparse` on an int8 deploy dir (bench times it; verify's Square
queries it and its logits give the verdicts), and measuring the int8 kernels against ONNX
Runtime's reference int8 math on a whole network (the largest logit drift). Its ops are those
dnr-export's CNNs use; any other is named in an `UnsupportedInt8Graph` error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dnr_deploy.deploydir import signing
from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.deploydir.names import INPUT_NAME, MODEL_FILE, OUTPUT_NAME
from dnr_deploy.export.sparse_int8 import INT8_CSR_FILE, Int8CsrError, read_int8_csr
from dnr_deploy.runtime.sparse.int8 import Int8SparseConv, table_add


class UnsupportedInt8Graph(ValueError):
    """A node the int8 graph runner has no rule for."""


# every op `Int8Graph._run` has a rule for
KNOWN_OPS = frozenset({"Constant", "DequantizeLinear", "QuantizeLinear", "Conv", "Gemm",
                       "MaxPool", "Sub", "Add", "Div", "Mul", "Relu", "GlobalAveragePool",
                       "ReduceMean", "Reshape", "Flatten"})


# ops that are the same on any layout (constants are broadcast to match)
_ELEMENTWISE = frozenset({"Sub", "Add", "Div", "Mul", "Relu"})


class _Quantized:
    """A uint8 tensor with its scale and zero point (a QuantizeLinear's output)."""

    def __init__(self, q: np.ndarray, scale: float, zero_point: int) -> None:
        self.q, self.scale, self.zero_point = q, scale, zero_point

    def dequantized(self) -> np.ndarray:
        return ((self.q.astype(np.int32) - self.zero_point).astype(np.float32) *
                np.float32(self.scale))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _max_pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    """k x k windows with stride k, on CHWN x (uint8 or float)."""
    k, s = attrs["kernel_shape"], attrs.get("strides", attrs["kernel_shape"])
    if list(attrs.get("pads", [0, 0, 0, 0])) != [0, 0, 0, 0] or k != s or k[0] != k[1]:
        raise UnsupportedInt8Graph(f"MaxPool {attrs}: only k x k windows with stride k")
    size = k[0]
    h, w = x.shape[1] // size * size, x.shape[2] // size * size
    # elementwise maxima of the window's strided views: numpy's max over the axes of a
    # reshaped array took most of a VGG16 call at batch 16
    out = x[:, 0:h:size, 0:w:size]
    for a in range(size):
        for b in range(size):
            if a or b:
                out = np.maximum(out, x[:, a:h:size, b:w:size])
    return out


# NCHW axis -> CHWN axis
_CHWN_AXIS = {0: 3, 1: 0, 2: 1, 3: 2}


def _to_nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(3, 0, 1, 2) if x.ndim == 4 else x


def _to_chwn(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0)) if x.ndim == 4 else x


def _const_like_chwn(value: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against an NCHW activation, made to broadcast against its
    CHWN form (a (1, C, 1, 1) mean becomes (C, 1, 1, 1))."""
    if value.ndim == 0:
        return value
    return value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(1, 2, 3, 0)


class Int8Graph:
    """model.onnx (QDQ) + weights.int8.npz of an irregular int8 deploy dir, callable on
    float32 NCHW images; `int8_nodes` names the nodes the int8 kernels run."""

    def __init__(self, deploy_dir: Path, threads: int = 1, path: str | None = None) -> None:
        model = onnx.load(str(Path(deploy_dir) / MODEL_FILE), load_external_data=False)
        self.graph = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.layers = {layer.node: layer for layer in read_int8_csr(
            Path(deploy_dir) / INT8_CSR_FILE)}
        self.threads, self.path = threads, path
        self.convs: dict[str, Int8SparseConv] = {}
        for layer in self.layers.values():
            self.convs[layer.node] = Int8SparseConv.from_layer(layer, relu=False)
        self.int8_nodes = sorted(self.convs)
        readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # value -> (node, slot)
        for node in self.graph.node:
            for slot, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, slot))
        # the weights' DequantizeLinear nodes (and what only they read) feed nothing the int8
        # kernels use: each call dequantized every dense weight of the network for nothing
        # (VGG16 at batch 1: most of 110 ms, where its kernels take under 3)
        self.skipped = self._weight_only_outputs(readers)
        self.output_sizes: dict[str, tuple[int, int]] = {}  # node -> its output's H x W
        # each int8 layer's QuantizeLinear, whose requantization its kernel's epilogue does
        output_of = {node.name: node.output[0] for node in self.graph.node}
        self.requantize = {
            name: next(n for n, _ in readers[output_of[name]] if n.op_type == "QuantizeLinear")
            for name, layer in self.layers.items() if layer.output_scale is not None}
        # Adds of two quantized tensors whose one reader is a QuantizeLinear (ResNet's
        # residual joins): done on the integers through a table, that QuantizeLinear included
        self.add_requantize = {}
        for node in self.graph.node:
            sole = readers.get(node.output[0], [])
            if node.op_type == "Add" and len(sole) == 1 and sole[0][0].op_type == "QuantizeLinear":
                self.add_requantize[node.name] = sole[0][0]
        self._add_tables: dict[tuple, np.ndarray] = {}
        # the nodes each call walks, attributes parsed once (protobuf parsing on every call
        # was a measurable part of a batch-1 call)
        self._walk = [(node, _attrs(node)) for node in self.graph.node
                      if node.output[0] not in self.skipped]

    def _weight_only_outputs(self, readers: dict) -> set[str]:
        """Outputs that only the int8-run nodes' weight and bias inputs read, transitively."""
        skipped: set[str] = set()
        for node in reversed(self.graph.node):
            used = [(n, slot) for name in node.output for n, slot in readers.get(name, [])]
            if used and all((n.name in self.convs and slot > 0) or n.output[0] in skipped
                            for n, slot in used):
                skipped.update(node.output)
        return skipped

    def __call__(self, images: np.ndarray) -> np.ndarray:
        values: dict[str, object] = {INPUT_NAME: _to_chwn(np.asarray(images, np.float32))}
        fused: set[str] = set()
        for node, attrs in self._walk:
            if node.output[0] in fused:
                continue
            outs = self._run(node, attrs, values, fused)
            for name, value in zip(node.output, outs, strict=False):
                values[name] = value
        out = values[OUTPUT_NAME]
        out = out.dequantized() if isinstance(out, _Quantized) else out
        # a copy: a kernel's output buffer is reused by its next call
        return np.array(_to_nchw(out), np.float32, order="C", copy=True)

    def run(self, output_names: list[str], feed: dict) -> list[np.ndarray]:
        """ONNX Runtime's `InferenceSession.run` shape, so bench and verify call it alike."""
        return [self(feed[INPUT_NAME])]

    def macs(self, input_shape: list[int]) -> dict:
        """Dense and nonzero multiply-adds per image of the int8 layers, at `input_shape`."""
        if not self.output_sizes:  # the layers' output sizes: one image through the graph
            self(np.zeros((1, *input_shape), np.float32))
        dense = nonzero = 0
        for node, layer in self.layers.items():
            pixels = int(np.prod(self.output_sizes[node]))
            dense += pixels * int(np.prod(layer.shape))
            nonzero += pixels * len(layer.data)
        return {"dense": dense, "nonzero": nonzero}

    def _value(self, values: dict, name: str):
        return values[name] if name in values else self.consts[name]

    def _float(self, values: dict, name: str) -> np.ndarray:
        value = self._value(values, name)
        return value.dequantized() if isinstance(value, _Quantized) else value

    def _run(self, node: onnx.NodeProto, attrs: dict, values: dict, fused: set) -> list:
        op = node.op_type
        if op == "Constant":
            return [numpy_helper.to_array(attrs["value"])]
        if op == "DequantizeLinear":
            source = self._value(values, node.input[0])
            if isinstance(source, _Quantized):
                return [source]  # kept quantized: a Conv reads its integers
            scale = self.consts[node.input[1]]
            zero = self.consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int32)
            axis = attrs.get("axis", 1)
            if scale.ndim == 1 and source.ndim > 1:
                shape = [1] * source.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            return [(source.astype(np.float64) - zero).astype(np.float32) * scale]
        if op == "QuantizeLinear":
            scale = float(self.consts[node.input[1]])
            zero = int(self.consts[node.input[2]])
            source = self._value(values, node.input[0])
            if isinstance(source, _Quantized) and (source.scale, source.zero_point) == \
                    (scale, zero):  # a DequantizeLinear -> QuantizeLinear round trip: exact
                return [source]
            x = self._float(values, node.input[0])
            q = np.clip(np.rint(x / np.float32(scale)) + zero, 0, 255).astype(np.uint8)
            return [_Quantized(q, scale, zero)]
        if op in ("Conv", "Gemm") and node.name in self.convs:
            return [self._int8_layer(node, values, fused)]
        if op == "MaxPool" and isinstance(source := self._value(values, node.input[0]),
                                          _Quantized):
            # dequantizing is monotone: the max of the integers is the integer of the max
            return [_Quantized(_max_pool(source.q, attrs), source.scale, source.zero_point)]
        if op == "Add" and node.name in self.add_requantize:
            result = self._quantized_add(node, values, fused)
            if result is not None:
                return [result]
        x = [self._float(values, name) if name else None for name in node.input]
        activation_4d = any(name in values and getattr(values[name], "ndim", 0) == 4
                            for name in node.input)
        if op in _ELEMENTWISE and activation_4d:  # constants made to broadcast on CHWN
            x = [_const_like_chwn(v) if name not in values and v is not None else v
                 for name, v in zip(node.input, x, strict=True)]
        if op == "MaxPool":
            return [_max_pool(x[0], attrs)]
        if op == "GlobalAveragePool":
            return [x[0].mean(axis=(1, 2), keepdims=True)]
        axes = (tuple(int(a) for a in (x[1] if len(x) > 1 else attrs["axes"]))
                if op == "ReduceMean" else ())
        if op == "ReduceMean" and x[0].ndim == 4 and attrs.get("keepdims", 1):
            return [x[0].mean(axis=tuple(_CHWN_AXIS[a % 4] for a in axes), keepdims=True)]
        if op not in _ELEMENTWISE:  # the rest reads NCHW: converted here, and back if 4-D
            x = [_to_nchw(v) if v is not None and name in values else v
                 for name, v in zip(node.input, x, strict=True)]
        simple = {"Sub": lambda: x[0] - x[1], "Add": lambda: x[0] + x[1],
                  "Div": lambda: x[0] / x[1], "Mul": lambda: x[0] * x[1],
                  "Relu": lambda: np.maximum(x[0], 0),
                  "ReduceMean": lambda: x[0].mean(
                      axis=axes, keepdims=bool(attrs.get("keepdims", 1))),
                  "Reshape": lambda: x[0].reshape([int(d) for d in x[1]]),
                  "Flatten": lambda: x[0].reshape(x[0].shape[0], -1)}
        if op not in simple:
            raise UnsupportedInt8Graph(f"node {node.name!r} ({op}) has no int8 graph rule")
        out = np.asarray(simple[op](), np.float32)
        return [out if op in _ELEMENTWISE else _to_chwn(out)]

    def _quantized_add(self, node: onnx.NodeProto, values: dict, fused: set):
        """Add(DequantizeLinear(a), DequantizeLinear(b)) -> QuantizeLinear as one lookup in a
        256 x 256 table of the same float32 steps (so the same bytes): the float path
        dequantized both, added and requantized, ten passes over float32 where this reads
        each byte once (`int8.table_add`). None when the inputs are not two quantized tensors
        of one shape."""
        a, b = (self._value(values, name) for name in node.input)
        if not (isinstance(a, _Quantized) and isinstance(b, _Quantized)) or \
                a.q.shape != b.q.shape:
            return None
        quantize = self.add_requantize[node.name]
        scale = float(self.consts[quantize.input[1]])
        zero = int(self.consts[quantize.input[2]])
        key = (a.scale, a.zero_point, b.scale, b.zero_point, scale, zero)
        if key not in self._add_tables:
            levels = np.arange(256, dtype=np.int32)
            fa = _Quantized(levels, a.scale, a.zero_point).dequantized()
            fb = _Quantized(levels, b.scale, b.zero_point).dequantized()
            total = fa[:, None] + fb[None, :]
            self._add_tables[key] = np.clip(np.rint(total / np.float32(scale)) + zero, 0,
                                            255).astype(np.uint8).reshape(-1)
        result = _Quantized(table_add(a.q, b.q, self._add_tables[key]), scale, zero)
        fused.add(quantize.output[0])
        values[quantize.output[0]] = result
        return result

    def _int8_layer(self, node: onnx.NodeProto, values: dict, fused: set):
        source = self._value(values, node.input[0])
        if not isinstance(source, _Quantized):
            raise UnsupportedInt8Graph(f"{node.name}: its input is not quantized")
        conv, layer = self.convs[node.name], self.layers[node.name]
        x = source.q
        if x.ndim != 4:  # a Gemm's (N, K) input: a 1x1 conv on (K, 1, 1, N)
            x = np.ascontiguousarray(x.reshape(x.shape[0], -1).T.reshape(-1, 1, 1, x.shape[0]))
        elif conv.stride > 1 and not x.flags.c_contiguous:  # the phase split wants it whole
            x = np.ascontiguousarray(x)
        out = conv(x, threads=self.threads, path=self.path)
        self.output_sizes[node.name] = out.shape[1:3]
        if node.op_type == "Gemm":
            out = np.ascontiguousarray(out.reshape(out.shape[0], -1).T)
        if layer.output_scale is None:
            return out
        # the QuantizeLinear after this layer ran in the kernel's epilogue
        quantize = self.requantize[node.name]
        fused.add(quantize.output[0])
        result = _Quantized(out, layer.output_scale, layer.output_zero_point)
        values[quantize.output[0]] = result
        return result


def load_int8_graph(deploy_dir: str | Path, threads: int = 1,
                    verify_key: str | Path | None = None) -> Int8Graph:
    """An irregular int8 deploy dir as a callable, checked as `load_sparse` checks a float one:
    with `verify_key`, its signature; every file's sha256; the int8 CSR's sizes before use.

    Raises:
        ManifestError: not a deploy dir, no weights.int8.npz in its manifest, a file that
            fails its sha256 (or, with `verify_key`, no valid signature), or a damaged file.
        UnsupportedInt8Graph: a node the runner has no rule for.
    """
    folder = Path(deploy_dir)
    signing.checked_manifest(folder, verify_key, INT8_CSR_FILE, lambda _: ManifestError(
        f"{str(deploy_dir)!r} holds no {INT8_CSR_FILE} in its manifest: not an irregular int8 "
        "export"))
    try:
        graph = Int8Graph(folder, threads)
    except Int8CsrError as err:
        raise ManifestError(str(err)) from None
    except Exception as err:  # protobuf's DecodeError and friends: a damaged model.onnx
        if isinstance(err, UnsupportedInt8Graph):
            raise
        raise ManifestError(f"{MODEL_FILE} cannot be read ({err})") from None
    for node in graph.graph.node:  # unknown ops refused now, not on the first image
        float_layer = node.op_type in ("Conv", "Gemm") and node.name not in graph.convs
        if node.op_type not in KNOWN_OPS or float_layer:
            raise UnsupportedInt8Graph(f"node {node.name!r} ({node.op_type}) has no int8 "
                                       "graph rule")
    return graph
