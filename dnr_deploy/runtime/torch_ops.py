"""The ONNX ops the ONNX -> torch re-import (onnx_torch.py) interprets, one torch function
each: `OPS` maps op_type -> handler(inputs, attributes) -> outputs. Add an op here, with a test
against ONNX Runtime (tests/test_runtime_onnx_torch.py); why this is hand-written is in
onnx_torch.py's docstring."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Op = Callable[[list, dict], list]


class UnsupportedGraphError(ValueError):
    """A graph the interpreter cannot run faithfully (an op or attribute it does not know)."""


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of an ONNX sparse tensor (indices linearized [NNZ] or coordinates
    [NNZ, rank], both allowed by the ONNX spec)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _pads_2d(pads: list[int] | None) -> tuple[int, int, int, int]:
    """ONNX pads [top, left, bottom, right] -> F.pad order (left, right, top, bottom)."""
    top, left, bottom, right = pads or [0, 0, 0, 0]
    return left, right, top, bottom


def _check_auto_pad(attrs: dict, op: str) -> None:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise UnsupportedGraphError(f"{op} with auto_pad={auto_pad} is not supported")


def _conv(inputs: list, attrs: dict) -> list:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    pad = _pads_2d(attrs.get("pads"))
    if pad[0] == pad[1] and pad[2] == pad[3]:
        padding = (pad[2], pad[0])
    else:  # asymmetric: pad explicitly, with zeros as Conv does
        x, padding = F.pad(x, pad), (0, 0)
    return [F.conv2d(x, weight, bias, stride=tuple(attrs.get("strides", [1, 1])),
                     padding=padding, dilation=tuple(attrs.get("dilations", [1, 1])),
                     groups=int(attrs.get("group", 1)))]


def _max_pool(inputs: list, attrs: dict) -> list:
    x, pad = inputs[0], _pads_2d(attrs.get("pads"))
    if pad[0] == pad[1] and pad[2] == pad[3]:
        padding = (pad[2], pad[0])
    else:
        x, padding = F.pad(x, pad, value=float("-inf")), (0, 0)
    kernel = tuple(attrs["kernel_shape"])
    return [F.max_pool2d(x, kernel, stride=tuple(attrs.get("strides", kernel)), padding=padding,
                         dilation=tuple(attrs.get("dilations", [1, 1])),
                         ceil_mode=bool(attrs.get("ceil_mode", 0)))]


def _average_pool(inputs: list, attrs: dict) -> list:
    pad = _pads_2d(attrs.get("pads"))
    if not (pad[0] == pad[1] and pad[2] == pad[3]):
        raise UnsupportedGraphError("AveragePool with asymmetric pads is not supported")
    kernel = tuple(attrs["kernel_shape"])
    return [F.avg_pool2d(inputs[0], kernel, stride=tuple(attrs.get("strides", kernel)),
                         padding=(pad[2], pad[0]), ceil_mode=bool(attrs.get("ceil_mode", 0)),
                         count_include_pad=bool(attrs.get("count_include_pad", 0)))]


def _axes(inputs: list, attrs: dict, position: int) -> list[int] | None:
    """Axes from the input at `position` (opset >= 13/18) or the `axes` attribute, or None."""
    if len(inputs) > position and inputs[position] is not None:
        return [int(a) for a in inputs[position].tolist()]
    return [int(a) for a in attrs["axes"]] if "axes" in attrs else None


def _reduced_axes(inputs: list, attrs: dict) -> list[int] | None:
    """The axes a Reduce* op reduces (opset >= 18: the second input; older: the attribute);
    none given means all of them, or no reduction at all with noop_with_empty_axes (None)."""
    axes = _axes(inputs, attrs, 1)
    if axes:
        return axes
    return None if attrs.get("noop_with_empty_axes", 0) else list(range(inputs[0].dim()))


def _reduce_mean(inputs: list, attrs: dict) -> list:
    axes = _reduced_axes(inputs, attrs)
    if axes is None:
        return [inputs[0]]
    return [inputs[0].mean(dim=axes, keepdim=bool(attrs.get("keepdims", 1)))]


def _reshape(inputs: list, attrs: dict) -> list:
    x, shape = inputs[0], [int(s) for s in inputs[1].tolist()]
    if not attrs.get("allowzero", 0):  # a 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = int(attrs.get("axis", 1)) % max(x.dim(), 1)
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


def _gemm(inputs: list, attrs: dict) -> list:
    a, b = inputs[0], inputs[1]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        out = out + float(attrs.get("beta", 1.0)) * inputs[2]
    return [out]


def _batch_norm(inputs: list, attrs: dict) -> list:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False,
                         eps=float(attrs.get("epsilon", 1e-5)))]


def _constant(inputs: list, attrs: dict) -> list:
    if "value" in attrs:
        return [torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())]
    if "sparse_value" in attrs:
        return [torch.from_numpy(sparse_to_dense(attrs["sparse_value"]))]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    raise UnsupportedGraphError(f"Constant with attributes {sorted(attrs)} is not supported")


# Integer range of a quantized tensor, by the dtype of its zero point (ONNX's rule).
_QUANT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127),
                 torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def _along_axis(values: torch.Tensor, like: torch.Tensor, attrs: dict) -> torch.Tensor:
    """A per-axis scale or zero point shaped to broadcast against `like` (scalars as they are)."""
    if values.dim() == 0 or values.numel() == 1:
        return values.reshape(())
    axis = int(attrs.get("axis", 1)) % like.dim()
    shape = [1] * like.dim()
    shape[axis] = values.numel()
    return values.reshape(shape)


def _zero_point(inputs: list) -> torch.Tensor:
    if len(inputs) > 2 and inputs[2] is not None:
        return inputs[2]
    return torch.zeros((), dtype=torch.uint8)  # ONNX's default: uint8 zero


def _quantize_linear(inputs: list, attrs: dict) -> list:
    """saturate(round_half_even(x / scale) + zero_point), carried as a float tensor holding the
    integers. The rounding passes the gradient straight through (BPDA, Athalye et al. 2018: it
    has no useful one of its own); the saturation keeps its true gradient, zero outside the
    range, because the quantizer folds ReLU into it (a zero point at 0 clips the negatives)."""
    x, zero_point = inputs[0], _zero_point(inputs)
    if zero_point.dtype not in _QUANT_RANGES:
        raise UnsupportedGraphError(f"QuantizeLinear to {zero_point.dtype} is not supported")
    low, high = _QUANT_RANGES[zero_point.dtype]
    scaled = x / _along_axis(inputs[1], x, attrs) + _along_axis(zero_point.float(), x, attrs)
    exact = torch.clamp(torch.round(scaled), low, high)  # torch.round: half to even, as ONNX
    inside = ((scaled >= low) & (scaled <= high)).to(scaled.dtype)
    return [exact.detach() + (scaled - scaled.detach()) * inside]


def _dequantize_linear(inputs: list, attrs: dict) -> list:
    """(q - zero_point) * scale in float32, for activations (float-held integers from
    `_quantize_linear`) and int8 weight initializers alike."""
    q = inputs[0].float()
    zero_point = _along_axis(_zero_point(inputs).float(), q, attrs)
    return [(q - zero_point) * _along_axis(inputs[1], q, attrs)]


def _clip(inputs: list, attrs: dict) -> list:
    """ReLU6 and friends (MobileNet): bounds are optional inputs since opset 11, attributes
    before it."""
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return [torch.clamp(inputs[0], min=low, max=high)]


# op_type -> handler(inputs, attributes) -> outputs. Add an op here, with a test against ORT.
def _split(inputs: list, attrs: dict) -> list:
    """ONNX Split: sizes from the `split` input, else `num_outputs` chunks of ceil(size / n),
    the last one what is left."""
    x, axis = inputs[0], int(attrs.get("axis", 0))
    if len(inputs) > 1 and inputs[1] is not None:
        return list(torch.split(x, [int(s) for s in inputs[1].tolist()], dim=axis))
    if "num_outputs" not in attrs:
        raise UnsupportedGraphError("Split needs a `split` input or `num_outputs` (opset 18)")
    chunks, size = int(attrs["num_outputs"]), x.shape[axis]
    sizes = [-(-size // chunks)] * (chunks - 1)  # ONNX's reference: the rest goes last
    return list(torch.split(x, [*sizes, size - sum(sizes)], dim=axis))


def _transpose(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    perm = [int(p) for p in attrs.get("perm", range(x.dim() - 1, -1, -1))]
    return [x.permute(perm)]


# Shape arithmetic and indexing: what the exporter writes for transformers (Swin's window
# partition, padding and relative-position bias, its LayerNorm and GELU). Shapes are int64
# tensors, as in ONNX; the graph's own arithmetic on them is ordinary tensor math.
def _shape(inputs: list, attrs: dict) -> list:
    dims = list(inputs[0].shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return [torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)]


def _gather(inputs: list, attrs: dict) -> list:
    """numpy.take(data, indices, axis): the indices' shape replaces the axis."""
    data, indices = inputs[0], inputs[1].long()
    axis = int(attrs.get("axis", 0)) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = torch.index_select(data, axis, indices.reshape(-1).to(data.device))
    return [picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))]


def _gather_nd(inputs: list, attrs: dict) -> list:
    if int(attrs.get("batch_dims", 0)):
        raise UnsupportedGraphError("GatherND with batch_dims > 0 is not supported")
    data, indices = inputs[0], inputs[1].long()
    return [data[tuple(indices.unbind(-1))]]


def _slice(inputs: list, attrs: dict) -> list:
    """numpy slicing per axis (negative and out-of-range bounds clamped, negative steps)."""
    x = inputs[0]
    starts, ends = inputs[1].tolist(), inputs[2].tolist()
    axes = _axes(inputs, attrs, 3) or list(range(len(starts)))
    steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else \
        [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        # Python's slicing clamps exactly as the ONNX spec says; torch's views take positive
        # steps only (the attack loop runs this every step), range() the negative ones
        window = slice(int(start), int(end), int(step))
        if window.step > 0:
            x = x[(slice(None),) * (axis % x.dim()) + (window,)]
            continue
        kept = torch.tensor(list(range(x.shape[axis])[window]), dtype=torch.long,
                            device=x.device)
        x = torch.index_select(x, axis, kept)
    return [x]


def _squeeze(inputs: list, attrs: dict) -> list:
    axes = _axes(inputs, attrs, 1)
    return [inputs[0].squeeze() if axes is None else inputs[0].squeeze(tuple(axes))]


def _unsqueeze(inputs: list, attrs: dict) -> list:
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _expand(inputs: list, attrs: dict) -> list:
    """Bidirectional broadcast: a 1 in the shape keeps the input's dimension."""
    shape = torch.broadcast_shapes(inputs[0].shape, tuple(int(s) for s in inputs[1].tolist()))
    return [inputs[0].expand(shape)]


def _range(inputs: list, attrs: dict) -> list:
    start, limit, delta = (t.item() for t in inputs[:3])
    return [torch.arange(start, limit, delta, dtype=inputs[0].dtype)]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}


def _pad(inputs: list, attrs: dict) -> list:
    """ONNX pads [begin of each axis..., end of each axis...] -> F.pad's last-axis-first pairs."""
    x, pads = inputs[0], [int(p) for p in inputs[1].tolist()]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    axes = _axes(inputs, attrs, 3) or list(range(x.dim()))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for axis, before, after in zip(axes, pads[:len(axes)], pads[len(axes):], strict=True):
        begin[axis % x.dim()], end[axis % x.dim()] = before, after
    pairs = [p for axis in reversed(range(x.dim())) for p in (begin[axis], end[axis])]
    while len(pairs) > 2 and pairs[-2:] == [0, 0]:  # F.pad: only the axes that change
        pairs = pairs[:-2]
    value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None else 0.0
    if mode == "constant":
        return [F.pad(x, pairs, value=value)]
    return [F.pad(x, pairs, mode=_PAD_MODES[mode])]


def _reduce_l2(inputs: list, attrs: dict) -> list:
    axes = _reduced_axes(inputs, attrs)
    if axes is None:
        return [inputs[0]]
    return [torch.linalg.vector_norm(inputs[0], 2, dim=axes,
                                     keepdim=bool(attrs.get("keepdims", 1)))]


def _layer_norm(inputs: list, attrs: dict) -> list:
    """Normalized over `axis` to the last axis; also the Mean and InvStdDev outputs."""
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    dims = list(range(int(attrs.get("axis", -1)) % x.dim(), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dim=dims, keepdim=True)
                          + float(attrs.get("epsilon", 1e-5)))
    y = (x - mean) * inv_std * scale
    return [y if bias is None else y + bias, mean, inv_std]


OPS: dict[str, Op] = {
    "Add": lambda i, a: [i[0] + i[1]],
    "Sub": lambda i, a: [i[0] - i[1]],
    "Mul": lambda i, a: [i[0] * i[1]],
    "Div": lambda i, a: [i[0] / i[1]],
    "Relu": lambda i, a: [F.relu(i[0])],
    "Clip": _clip,
    "Sigmoid": lambda i, a: [torch.sigmoid(i[0])],  # EfficientNet's SiLU: x * sigmoid(x)
    # max(0, min(1, alpha x + beta)), ONNX's defaults alpha 0.2, beta 0.5 (torch's differ)
    "HardSigmoid": lambda i, a: [torch.clamp(float(a.get("alpha", 0.2)) * i[0]
                                             + float(a.get("beta", 0.5)), 0.0, 1.0)],
    "HardSwish": lambda i, a: [F.hardswish(i[0])],  # MobileNetV3; ONNX's is torch's
    # opset >= 13 semantics (one axis, default -1); the same as older opsets' on 2-D logits
    "Softmax": lambda i, a: [F.softmax(i[0], dim=int(a.get("axis", -1)))],
    "Identity": lambda i, a: [i[0]],
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=(2, 3), keepdim=True)],
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Concat": lambda i, a: [torch.cat([t for t in i if t is not None], dim=int(a["axis"]))],
    "Split": _split,  # with Concat and Transpose: ShuffleNet's channel shuffle and split
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": lambda i, a: [i[0] @ i[1]],
    "BatchNormalization": _batch_norm,
    "Constant": _constant,
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
    "Erf": lambda i, a: [torch.erf(i[0])],  # exact GELU: x * (1 + erf(x / sqrt 2)) / 2
    "LayerNormalization": _layer_norm,
    "Shape": _shape,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Slice": _slice,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "Range": _range,
    "Pad": _pad,
    "ReduceL2": _reduce_l2,  # Swin v2's cosine attention (F.normalize)
}

# Attribute checks that a handler cannot express by itself: conditions ORT honours that the
# torch function has no argument for.
ATTRIBUTE_CHECKS = {"Conv": _check_auto_pad, "MaxPool": _check_auto_pad,
                     "AveragePool": _check_auto_pad}
