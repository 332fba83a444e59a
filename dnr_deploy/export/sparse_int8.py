"""`dnr-export --quantize int8` for irregular runs: the int8 CSR bundle beside a dense QDQ graph.

ONNX Runtime's quantizer cannot read sparse initializers, so the float graph is exported once
more with dense initializers (in a scratch folder) and quantized as the channel path does
(`export/quantize.py`: int8 symmetric weights per output channel, uint8 activations calibrated
by MinMax on training images, the same reduce-range choice). What the deploy dir ships:

- model.onnx: that dense QDQ graph. ONNX Runtime loads it, verify attacks it (the re-import
  rounds like the reference int8 math), bench times it; it is ONNX Runtime's int8 reference.
- model.fp32.onnx: the float graph with sparse initializers, as a float irregular export
  writes it (the transfer attacks' source, bench's float reference).
- weights.int8.npz: every quantized Conv / Gemm of model.onnx as int8 CSR, read from the QDQ
  graph itself, so the sparse int8 kernels and ONNX Runtime multiply the very same integers.

Layout of weights.int8.npz (np.savez_compressed; arrays only, read with allow_pickle=False):

    header              uint8   UTF-8 JSON: format, and per layer its ONNX node, op, shape,
                                stride, padding, input and output quantization
    <layer>/data        int8    nonzero weights, row by row
    <layer>/indices     uint16  their column in out x in*kh*kw (int32 past 65535 columns)
    <layer>/indptr      int32   row r spans data[indptr[r]:indptr[r + 1]]
    <layer>/scale       float32 per output row: the weight scale (zero point 0, symmetric)
    <layer>/bias        float32 per output row, dequantized (s_x * s_w * int32 bias)

3 bytes a nonzero instead of the float bundle's 8, before deflate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

INT8_CSR_FILE = "weights.int8.npz"
INT8_CSR_FORMAT = "dnr-deploy/csr-int8/1"
# a bound for reading: no layer of this project holds more (VGG16's largest: 2.4M weights)
MAX_LAYER_WEIGHTS = 2**28


class Int8CsrError(ValueError):
    """A weights.int8.npz that is missing, unreadable, or not what `write_int8_csr` writes."""


@dataclass
class Int8Layer:
    """One quantized Conv or Gemm: int8 CSR weights and the scales around them."""

    node: str
    op: str  # "Conv" or "Gemm"
    shape: tuple[int, ...]  # (out, in, kh, kw) or (out, in)
    stride: int
    padding: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray  # int8
    scale: np.ndarray  # float32 per output row
    bias: np.ndarray  # float32 per output row
    input_scale: float
    input_zero_point: int
    output_scale: float | None  # None: the output stays float (no QuantizeLinear follows)
    output_zero_point: int | None

    def header(self) -> dict:
        return {"node": self.node, "op": self.op, "shape": list(self.shape),
                "stride": self.stride, "padding": self.padding,
                "input_scale": self.input_scale, "input_zero_point": self.input_zero_point,
                "output_scale": self.output_scale, "output_zero_point": self.output_zero_point}

    def dense(self) -> np.ndarray:
        """The int8 weight as a dense (out, columns) int32 matrix."""
        rows = self.shape[0]
        matrix = np.zeros((rows, int(np.prod(self.shape[1:]))), np.int32)
        row_of = np.repeat(np.arange(rows), np.diff(self.indptr))
        matrix[row_of, self.indices.astype(np.int64)] = self.data
        return matrix


def dense_float_graph(model, example, scratch: Path, opset: int) -> Path:
    """The float network as ONNX with dense initializers (the quantizer's input)."""
    from dnr_deploy.export import onnx as onnx_io

    path = scratch / "dense.fp32.onnx"
    onnx_io.export_onnx(model, example, path, opset)
    return path


def add_int8_csr(work: Path, record: dict) -> dict:
    """weights.int8.npz from work's QDQ model.onnx; `record` (the manifest's quantization
    entry) gains its figures: layers, bytes, and the size against the float CSR bundle."""
    from dnr_deploy.deploydir import names

    layers = extract_layers(work / names.MODEL_FILE)
    size = write_int8_csr(work / INT8_CSR_FILE, layers)
    float_size = (work / names.CSR_FILE).stat().st_size
    return {**record, "sparse_int8": {
        "file": INT8_CSR_FILE, "layers": len(layers), "bytes": size,
        "nonzeros": int(sum(len(layer.data) for layer in layers)),
        "bytes_vs_float_csr": round(size / float_size, 4),
        "weights": "int8 CSR, symmetric, per output row scale (read from model.onnx)"}}


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def extract_layers(qdq_path: Path) -> list[Int8Layer]:
    """Every Conv and Gemm of a QDQ graph whose input and weight come through
    DequantizeLinear, as int8 CSR (zero weights dropped), in graph order.

    Raises:
        Int8CsrError: a weight that is not symmetric int8 per output channel.
    """
    graph = onnx.load(str(qdq_path)).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def dequantized(name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        scale = inits.get(node.input[1])
        zero = inits.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        return (node.input[0], scale, zero) if scale is not None else None

    layers = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        act, weight = dequantized(node.input[0]), dequantized(node.input[1])
        if act is None or weight is None or weight[0] not in inits:
            continue
        q = inits[weight[0]]
        if q.dtype != np.int8 or np.any(weight[2] != 0):
            raise Int8CsrError(f"{node.name}: weights are not symmetric int8")
        if node.op_type == "Gemm" and not _attr(node, "transB", 0):
            q = q.T  # stored (in, out): our rows are outputs
        rows = q.shape[0]
        scale = np.broadcast_to(np.asarray(weight[1], np.float32).reshape(-1), (rows,))
        bias = np.zeros(rows, np.float32)
        if len(node.input) > 2 and node.input[2]:
            found = dequantized(node.input[2])
            if found is not None and found[0] in inits:
                bias = ((inits[found[0]].astype(np.float64) - found[2].astype(np.float64)) *
                        found[1].astype(np.float64)).astype(np.float32)
            elif node.input[2] in inits:
                bias = inits[node.input[2]].astype(np.float32)
        after = readers.get(node.output[0], [])
        out_q = after[0] if len(after) == 1 and after[0].op_type == "QuantizeLinear" else None
        matrix = q.reshape(rows, -1)
        r, c = np.nonzero(matrix)
        indptr = np.zeros(rows + 1, np.int32)
        np.cumsum(np.bincount(r, minlength=rows), out=indptr[1:])
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        strides = list(_attr(node, "strides", [1, 1]))
        layers.append(Int8Layer(
            node=node.name, op=node.op_type, shape=tuple(int(d) for d in q.shape),
            stride=int(strides[0]), padding=int(pads[0]), indptr=indptr,
            indices=c.astype(np.uint16 if matrix.shape[1] <= 65536 else np.int32),
            data=matrix[r, c].astype(np.int8), scale=np.ascontiguousarray(scale),
            bias=bias.reshape(-1), input_scale=float(np.asarray(act[1]).reshape(())),
            input_zero_point=int(np.asarray(act[2]).reshape(())),
            output_scale=None if out_q is None else float(inits[out_q.input[1]].reshape(())),
            output_zero_point=None if out_q is None else int(inits[out_q.input[2]].reshape(()))))
    return layers


def write_int8_csr(path: Path, layers: list[Int8Layer]) -> int:
    """Write `layers` to `path` atomically (temporary name, then rename); returns its bytes."""
    header = {"format": INT8_CSR_FORMAT, "layers": [layer.header() for layer in layers]}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
    for i, layer in enumerate(layers):
        for key in ("data", "indices", "indptr", "scale", "bias"):
            arrays[f"{i}/{key}"] = getattr(layer, key)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_int8_csr(path: Path) -> list[Int8Layer]:
    """The layers `write_int8_csr` wrote, every size checked before use.

    Raises:
        Int8CsrError: missing, unreadable or inconsistent.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(bytes(npz["header"]).decode())
            if header.get("format") != INT8_CSR_FORMAT:
                raise Int8CsrError(f"{path.name}: not {INT8_CSR_FORMAT}")
            layers = []
            for i, info in enumerate(header["layers"]):
                shape = tuple(int(d) for d in info["shape"])
                if len(shape) not in (2, 4) or min(shape) < 1 or \
                        int(np.prod(shape)) > MAX_LAYER_WEIGHTS:
                    raise Int8CsrError(f"{path.name}: layer {i} has shape {shape}")
                parts = {key: npz[f"{i}/{key}"] for key in
                         ("data", "indices", "indptr", "scale", "bias")}
                layer = Int8Layer(shape=shape, **parts, **{k: info[k] for k in (
                    "node", "op", "stride", "padding", "input_scale", "input_zero_point",
                    "output_scale", "output_zero_point")})
                _check_layer(path, layer)
                layers.append(layer)
            return layers
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, Int8CsrError):
            raise
        raise Int8CsrError(f"{path.name}: unreadable ({err})") from None


def _check_layer(path: Path, layer: Int8Layer) -> None:
    rows, columns = layer.shape[0], int(np.prod(layer.shape[1:]))
    p = layer.indptr.astype(np.int64)
    ok = (layer.data.dtype == np.int8 and len(p) == rows + 1 and p[0] == 0 and
          np.all(np.diff(p) >= 0) and p[-1] == len(layer.data) == len(layer.indices) and
          (len(layer.indices) == 0 or int(layer.indices.max()) < columns) and
          layer.scale.shape == (rows,) and layer.bias.shape == (rows,))
    if not ok:
        raise Int8CsrError(f"{path.name}: layer {layer.node} is not consistent CSR")
