"""Sizes read from an ONNX graph itself: stored parameters, MACs, activations per image.

The manifest's params and MACs come from the PyTorch side (`dnr_deploy.sizes`), so a deploy
dir whose model.onnx was swapped (and re-hashed) would otherwise show another network's
figures. Here the same figures are recomputed from the graph, without densifying anything:

- MACs count Conv, Gemm and MatMul-with-a-constant-weight nodes of the main graph exactly as
  `sizes.count_macs` counts Conv2d and Linear modules: weight elements x output positions /
  groups for a Conv, weight elements for Gemm and MatMul. The exporter keeps the weights'
  shapes, so this equals the manifest's `macs.executed` for model.onnx and `macs.dense` for
  baseline.onnx.
- Parameters: the elements the file stores as initializers (a sparse one counts its nonzeros).
  BatchNorm is folded into the convs on export, so this differs from the PyTorch count; export
  records it in the manifest ("onnx_sizes") and opening compares like with like.
- Activations: for each node, the elements of its batch-sized inputs and outputs per image
  (the peak a runtime that frees tensors needs) and the sum over all values (what autograd
  keeps for a backward pass), from ONNX shape inference with a symbolic batch.

Shape inference runs on a skeleton: large initializers become typed graph inputs (dims only),
so nothing is copied or densified; small ones (Reshape targets, axes) keep their data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import ModelProto, TensorProto, ValueInfoProto, helper, shape_inference

from dnr_deploy.deploydir.graph_check import GraphCheckError

SMALL_CONSTANT = 64  # initializers with at most this many elements keep their data
_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8,
          TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT32: 4, TensorProto.INT64: 8,
          TensorProto.BOOL: 1}


@dataclass(frozen=True)
class GraphSizes:
    """What the graph costs: figures to compare with the manifest and to size a batch."""

    params: int  # stored initializer elements (sparse: nonzeros)
    macs: int  # Conv / Gemm / MatMul multiply-accumulates for one image
    input_shape: list[int]  # the graph input's dims after the batch
    peak_bytes_per_image: int  # largest (inputs + outputs) of one node, per image
    total_bytes_per_image: int  # every batch-sized value, per image

    def record(self) -> dict:
        """What export writes into the manifest's "onnx_sizes" for one file."""
        return {"params": self.params, "macs": self.macs}


def graph_sizes(model: ModelProto, where: str) -> GraphSizes:
    """Raises:
        GraphCheckError: the graph's shapes cannot be inferred, or a counted node's weight or
            output shape is not known."""
    inferred = _infer(model, where)
    shapes = _shapes(inferred)
    batch = _batch_symbol(model, where)
    per_image = {name: math.prod(dims[1:]) * size for name, (dims, size) in shapes.items()
                 if dims and dims[0] == batch and all(isinstance(d, int) for d in dims[1:])}
    peak = 0
    for node in model.graph.node:
        peak = max(peak, sum(per_image.get(name, 0) for name in (*node.input, *node.output)))
    macs = sum(_node_macs(node, shapes, where) for node in model.graph.node)
    params = sum(math.prod(t.dims) for t in model.graph.initializer) + \
        sum(int(s.values.dims[0]) if s.values.dims else 0 for s in model.graph.sparse_initializer)
    input_dims = shapes[model.graph.input[0].name][0][1:]
    return GraphSizes(params, macs, [int(d) if isinstance(d, int) else -1 for d in input_dims],
                      peak, sum(per_image.values()))


def _skeleton(model: ModelProto) -> ModelProto:
    """`model` with its large weights replaced by typed inputs: shapes without the data."""
    graph = model.graph
    kept = [t for t in graph.initializer if math.prod(t.dims) <= SMALL_CONSTANT]
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if math.prod(t.dims) > SMALL_CONSTANT]
    typed += [helper.make_tensor_value_info(s.values.name, s.values.data_type, list(s.dims))
              for s in graph.sparse_initializer]
    skeleton = helper.make_graph(list(graph.node), graph.name, [*graph.input, *typed],
                                 list(graph.output), initializer=kept)
    result = helper.make_model(skeleton, opset_imports=list(model.opset_import),
                               functions=list(model.functions))
    result.ir_version = model.ir_version
    return result


def _infer(model: ModelProto, where: str) -> ModelProto:
    try:
        return shape_inference.infer_shapes(_skeleton(model), strict_mode=True, data_prop=True)
    except Exception as err:  # InferenceError and friends: shapes that do not fit together
        raise GraphCheckError(f"{where}: ONNX shape inference fails on its graph: "
                              f"{' '.join(str(err).split())[:200]}") from None


def _shapes(model: ModelProto) -> dict[str, tuple[list[int | str], int]]:
    """name -> (dims, bytes per element) of every typed value (ints, or a symbol's name)."""
    found: dict[str, tuple[list[int | str], int]] = {}
    values: list[ValueInfoProto] = [*model.graph.input, *model.graph.value_info,
                                    *model.graph.output]
    for value in values:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tensor.shape.dim]
        found[value.name] = (dims, _BYTES.get(tensor.elem_type, 4))
    for tensor in model.graph.initializer:
        found[tensor.name] = (list(tensor.dims), _BYTES.get(tensor.data_type, 4))
    return found


def _batch_symbol(model: ModelProto, where: str) -> str:
    if len(model.graph.input) != 1:
        raise GraphCheckError(f"{where} has {len(model.graph.input)} graph inputs; a dnr-export "
                              "graph has one")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise GraphCheckError(f"{where}: its input has no symbolic batch dimension; dnr-export "
                              "writes a dynamic batch")
    return dims[0].dim_param


def _node_macs(node, shapes: dict, where: str) -> int:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        return 0
    weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "MatMul" and (weight is None or len(weight[0]) != 2):
        return 0  # activation x activation: not a Linear layer, as PyTorch's count skips it
    output = shapes.get(node.output[0])
    if weight is None or output is None or not all(isinstance(d, int) for d in weight[0]) \
            or not all(isinstance(d, int) for d in output[0][2:]):
        raise GraphCheckError(f"{where}: the shapes of {node.op_type} {node.name!r} cannot be "
                              "inferred, so its MACs cannot be counted")
    elements = math.prod(weight[0])
    if node.op_type != "Conv":
        return elements
    group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
    return elements * math.prod(output[0][2:]) // group
