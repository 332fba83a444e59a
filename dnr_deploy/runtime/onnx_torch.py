"""The exported ONNX graph re-imported into PyTorch, so white-box attacks get the artifact's
gradients rather than the training model's.

Why hand-written: onnx2torch (unmaintained since 2024) cannot read the dynamo exporter's
opset-18 graphs (DESIGN.md section 7), and onnx.reference runs in numpy, without autograd. The
graphs dnr-export writes for this project's models use a dozen standard ops, so this module
interprets exactly those, node by node, with torch functions. Anything else is refused with
the op's name: a silently wrong gradient would make verification worthless.

Contract: `OnnxTorch(onnx.load(path))(x)` returns the logits ONNX Runtime would return for
`x` (verify checks that on every batch, max |difference| <= 1e-4) and is differentiable in
`x`. Sparse initializers are densified, as ONNX Runtime does at load. Every initializer is a
buffer, not a parameter: attacks need input gradients only.

Example: the `small` digits net exports to Sub, Div (the normalization), Conv x4 (BatchNorm
folded in), Relu x4, MaxPool, ReduceMean (global pooling), Reshape, Gemm. Swin adds shape
arithmetic (Shape, Gather, Slice, Range, Pad ...), LayerNormalization and Erf.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from dnr_deploy.runtime.torch_ops import (  # noqa: F401 (OPS and the error are this API's too)
    ATTRIBUTE_CHECKS,
    OPS,
    UnsupportedGraphError,
    sparse_to_dense,
)


class OnnxTorch(nn.Module):
    """An ONNX graph as a differentiable torch module (see the module docstring).

    Raises (at construction):
        UnsupportedGraphError: an op outside `OPS`, a non-standard domain, a node with
            several graph outputs this interpreter does not produce (MaxPool indices), a
            Conv or pool that is not 2-D, or a graph with more than one input.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        self._check_ops(graph)
        self._keys: dict[str, str] = {}
        initializers = [(t.name, numpy_helper.to_array(t)) for t in graph.initializer]
        initializers += [(s.values.name, sparse_to_dense(s)) for s in graph.sparse_initializer]
        for index, (name, array) in enumerate(initializers):
            key = f"init_{index}"  # ONNX names hold dots, which buffer names may not
            self.register_buffer(key, torch.from_numpy(np.array(array, copy=True)))
            self._keys[name] = key
        inputs = [i.name for i in graph.input if i.name not in self._keys]
        if len(inputs) != 1:
            raise UnsupportedGraphError(f"expected one graph input, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [o.name for o in graph.output]
        self._nodes = [
            (n.op_type, list(n.input), list(n.output),
             {a.name: helper.get_attribute_value(a) for a in n.attribute})
            for n in graph.node
        ]
        for op_type, _, _, attrs in self._nodes:
            if op_type in ATTRIBUTE_CHECKS:
                ATTRIBUTE_CHECKS[op_type](attrs, op_type)
            if op_type in ("Conv", "MaxPool", "AveragePool") and len(
                    attrs.get("kernel_shape", [0, 0])) != 2:
                raise UnsupportedGraphError(f"{op_type} is supported in 2-D only")

    @staticmethod
    def _check_ops(graph: onnx.GraphProto) -> None:
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS}
                         | {f"{n.domain}::{n.op_type}" for n in graph.node
                            if n.domain not in ("", "ai.onnx")})
        if unknown:
            raise UnsupportedGraphError(
                f"the ONNX graph uses {', '.join(unknown)}, which the ONNX->torch interpreter "
                f"does not implement (it knows {', '.join(sorted(OPS))}); add the op to "
                "dnr_deploy/runtime/torch_ops.py with a test against ONNX Runtime"
            )
        for node in graph.node:
            if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
                raise UnsupportedGraphError("MaxPool with an Indices output is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {name: getattr(self, key) for name, key in
                                        self._keys.items()}
        env[self.input_name] = x
        for op_type, names_in, names_out, attrs in self._nodes:
            inputs = [env[name] if name else None for name in names_in]
            outputs = OPS[op_type](inputs, attrs)
            for name, value in zip(names_out, outputs, strict=False):
                if name:
                    env[name] = value
        return env[self.output_names[0]]


def load_onnx_torch(path: str) -> OnnxTorch:
    """`OnnxTorch` of an ONNX file, in eval mode.

    Raises:
        UnsupportedGraphError: the file is not ONNX or holds an op the interpreter lacks.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)  # never a file it names
    except Exception as err:  # protobuf DecodeError and friends: all mean "not ONNX"
        raise UnsupportedGraphError(f"cannot parse {str(path)!r} as ONNX: {err}") from None
    return OnnxTorch(model).eval()
