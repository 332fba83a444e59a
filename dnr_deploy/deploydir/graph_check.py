"""An ONNX graph from a deploy dir, checked in full before any runtime reads it.

The sha256 table of the manifest vouches for the bytes of each listed file, not for what those
bytes ask a runtime to do. So before ONNX Runtime (or onnx.numpy_helper) sees a graph, this
module walks all of it: the main graph, model-local functions, and every subgraph held in a
node attribute (If / Loop / Scan bodies), with the tensors and sparse tensors of initializers
and attributes, and refuses

- external data anywhere (a tensor read from another file, which no sha256 covers: dnr-export
  always writes one self-contained file, folding the exporter's side file back in);
- a node of an unknown operator domain, or one that is not in its domain's schemas (a custom-op
  library would be needed, and nothing of the kind ships in a deploy dir);
- a sparse tensor whose dense form is out of proportion: dims that are negative, values or
  indices that disagree with the dims, or a total dense size more than
  `DENSE_ELEMENTS_PER_FILE_BYTE` elements per byte of the file (a density of about 0.1%),
  more than the manifest's dense parameter count, or more than the memory budget. ONNX Runtime
  densifies sparse initializers at load: a 98 KB file claiming huge dims took 4.3 GB.

Everything is read from the protobuf's dims; nothing is densified here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.resources import gib, memory_budget_bytes

# ONNX's own domains ("", ai.onnx.ml, ai.onnx.preview.training...), as the installed onnx
# package defines them
STANDARD_DOMAINS = frozenset({"ai.onnx", *(s.domain for s in onnx.defs.get_all_schemas())})
# ONNX Runtime's own contrib operators (its int8 quantizer may write them); checked against
# the schemas onnxruntime registers.
ORT_DOMAIN = "com.microsoft"
DENSE_ELEMENTS_PER_FILE_BYTE = 1024
MAX_DENSE_ELEMENTS = 2**34  # 64 GiB of float32: beyond any model an ONNX file here can hold


class GraphCheckError(ManifestError):
    """An ONNX file that asks for something a deploy dir must never contain, or that its
    manifest does not describe (every stage already maps ManifestError to exit code 2)."""


def iter_graphs(model: ModelProto) -> Iterator[tuple[str, GraphProto | None, list[NodeProto]]]:
    """(place, graph or None for a function body, nodes) of the main graph, each model-local
    function, and every subgraph in a node attribute, at any depth."""
    stack: list[tuple[str, GraphProto | None, list[NodeProto]]] = [
        ("the main graph", model.graph, list(model.graph.node))]
    stack += [(f"function {f.domain}:{f.name}", None, list(f.node)) for f in model.functions]
    while stack:
        place, graph, nodes = stack.pop()
        yield place, graph, nodes
        for node in nodes:
            for attr in node.attribute:
                subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for index, sub in enumerate(subgraphs):
                    stack.append((f"{place} > {node.op_type} {node.name!r} {attr.name}[{index}]",
                                  sub, list(sub.node)))


def iter_tensors(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every dense TensorProto: initializers, attribute tensors, sparse tensors' parts."""
    for place, graph, nodes in iter_graphs(model):
        if graph is not None:
            yield from ((place, t) for t in graph.initializer)
        for sparse_place, sparse in _sparse_in(place, graph, nodes):
            yield sparse_place, sparse.values
            yield sparse_place, sparse.indices
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield place, attr.t
                yield from ((place, t) for t in attr.tensors)


def iter_sparse(model: ModelProto) -> Iterator[tuple[str, onnx.SparseTensorProto]]:
    """Every SparseTensorProto: sparse initializers and attribute sparse tensors."""
    for place, graph, nodes in iter_graphs(model):
        yield from _sparse_in(place, graph, nodes)


def _sparse_in(place: str, graph: GraphProto | None, nodes: list[NodeProto]):
    if graph is not None:
        yield from ((place, s) for s in graph.sparse_initializer)
    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.SPARSE_TENSOR or attr.HasField("sparse_tensor"):
                yield place, attr.sparse_tensor
            yield from ((place, s) for s in attr.sparse_tensors)


def load_graph(path: Path) -> ModelProto:
    """The ONNX file at `path` without any external data (which `check_graph` refuses).

    Raises:
        GraphCheckError: not ONNX (truncated, damaged).
    """
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: all mean "not ONNX"
        raise GraphCheckError(f"{str(path)!r} is not an ONNX file (truncated or damaged?): "
                              f"{' '.join(str(err).split())[:200] or type(err).__name__}"
                              ) from None


def check_graph(model: ModelProto, path: Path, dense_params: int | None = None) -> None:
    """Refuse external data, unknown operators and oversized sparse tensors (module docstring).

    Args:
        model: the loaded file (`load_graph`).
        path: where it came from (its size bounds the sparse tensors; named in errors).
        dense_params: the manifest's dense parameter count, an upper bound on the dense size
            of the sparse tensors (None: not recorded).

    Raises:
        GraphCheckError: naming the file, the place in the graph and what is wrong.
    """
    check_no_external_data(model, path)
    check_operators(model, path)
    check_sparse_tensors(model, path, dense_params)


def check_no_external_data(model: ModelProto, path: Path) -> None:
    for place, tensor in iter_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise GraphCheckError(
                f"{str(path)!r} reads tensor {tensor.name!r} ({place}) from the file "
                f"{location!r} (ONNX external data), which the manifest's sha256 does not cover;"
                " re-export a self-contained model with dnr-export")


def check_operators(model: ModelProto, path: Path) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    # an opset import alone runs nothing (ONNX Runtime's quantizer imports ai.onnx.training
    # and uses none of it): the nodes are what is checked
    for place, _graph, nodes in iter_graphs(model):
        for node in nodes:
            if (node.domain, node.op_type) in local:
                continue
            if not _known_domain(node.domain, local) or not _has_schema(node):
                raise GraphCheckError(
                    f"{str(path)!r} uses the operator {node.domain or 'ai.onnx'}:{node.op_type} "
                    f"({place}), which is not a known ONNX operator; a deploy dir holds "
                    "standard ONNX only")


def _known_domain(domain: str, local: set[tuple[str, str]]) -> bool:
    return domain in STANDARD_DOMAINS or domain == ORT_DOMAIN \
        or any(domain == d for d, _ in local)


def _has_schema(node: NodeProto) -> bool:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain == ORT_DOMAIN:
        return node.op_type in _ort_contrib_ops()
    return onnx.defs.has(node.op_type, domain)


_ORT_OPS: set[str] | None = None


def _ort_contrib_ops() -> set[str]:
    global _ORT_OPS
    if _ORT_OPS is None:
        try:
            from onnxruntime.capi import onnxruntime_pybind11_state as state

            _ORT_OPS = {s.name for s in state.get_all_operator_schema() if s.domain == ORT_DOMAIN}
        except (ImportError, AttributeError):
            _ORT_OPS = set()
    return _ORT_OPS


def dense_elements(sparse: onnx.SparseTensorProto) -> int:
    return math.prod(int(d) for d in sparse.dims)


def stored_count(tensor: TensorProto) -> int | None:
    """How many elements `tensor` really stores (None: a type this check does not size)."""
    size = {TensorProto.FLOAT: 4, TensorProto.INT64: 8, TensorProto.INT32: 4,
            TensorProto.FLOAT16: 2, TensorProto.INT8: 1, TensorProto.UINT8: 1,
            TensorProto.DOUBLE: 8}.get(tensor.data_type)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // size if size else None
    fields = (tensor.float_data, tensor.int64_data, tensor.int32_data, tensor.double_data,
              tensor.uint64_data)
    return max(len(f) for f in fields)


def check_sparse_tensors(model: ModelProto, path: Path, dense_params: int | None) -> None:
    file_bytes = path.stat().st_size
    total = 0
    for place, sparse in iter_sparse(model):
        name = sparse.values.name or "?"
        where = f"{str(path)!r}: sparse tensor {name!r} ({place})"
        dims = [int(d) for d in sparse.dims]
        if not dims or min(dims) < 0:
            raise GraphCheckError(f"{where} has dims {dims[:8]}; re-export the run")
        dense = dense_elements(sparse)
        values = [int(d) for d in sparse.values.dims]
        nnz = values[0] if len(values) == 1 else -1
        index_dims = [int(d) for d in sparse.indices.dims]
        if not 0 <= nnz <= dense or index_dims not in ([nnz], [nnz, len(dims)]) \
                or stored_count(sparse.values) not in (nnz, None) \
                or stored_count(sparse.indices) not in (math.prod(index_dims), None):
            raise GraphCheckError(
                f"{where} has {values} values and {index_dims} indices for dims {dims[:8]}, "
                "which do not agree (damaged or forged); re-export the run")
        total += dense
    if not total:
        return
    limits = [(DENSE_ELEMENTS_PER_FILE_BYTE * file_bytes,
               f"{DENSE_ELEMENTS_PER_FILE_BYTE} x its {file_bytes:,} bytes")]
    limits.append((MAX_DENSE_ELEMENTS, "the absolute cap"))
    if dense_params is not None:
        limits.append((int(dense_params), "the manifest's dense parameter count"))
    budget = memory_budget_bytes()
    if budget is not None:
        limits.append((budget // 4, f"the {gib(budget)} of memory it may use"))
    for limit, what in limits:
        if total > limit:
            raise GraphCheckError(
                f"{str(path)!r}: its sparse tensors claim {total:,} dense elements, more than "
                f"{what} ({limit:,}); ONNX Runtime would densify them at load; refused before "
                "anything was allocated")
