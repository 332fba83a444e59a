"""`load_sparse`: an irregular deploy dir's model.onnx as a `SparseModel`, with numpy and onnx
only (no PyTorch at inference).

The graph is read node by node in its (topological) order. Conv -> [BatchNormalization] ->
[Add of a residual] -> [Relu] chains become one `SparseConv`: the norm folded into the weights
(a per-output-channel scale keeps every zero), the addition and the ReLU in the kernel's
epilogue. Gemm and MatMul run as 1x1 convs on a 1x1 image, so the compiled kernel runs them too.
The input's Sub/Div normalization is folded into the first conv. Everything else runs in numpy
(`onnx_ops`); an op without a step is refused in one line naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dnr_deploy.deploydir import names, signing
from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.runtime.sparse.model import (
    NotIrregularError,
    SparseModel,
    fold_normalization,
    link_convs,
)
from dnr_deploy.runtime.sparse.onnx_reader import GraphReader, LinearStep
from dnr_deploy.runtime.sparse.plan import DENSE_THRESHOLD, SparseConv

# The largest initializer (dense size, in floats) read: 1 GiB of float32, checked from the
# dims the file claims before anything is allocated.
MAX_INITIALIZER_FLOATS = 1 << 28


def _bounded(dims, what: str) -> list[int]:
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims) or math.prod(dims) > MAX_INITIALIZER_FLOATS:
        raise ManifestError(f"model.onnx: {what} claims dims {dims}, over the bound of "
                            f"{MAX_INITIALIZER_FLOATS} values; re-export the run")
    return dims


def _tensor(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise ManifestError(f"model.onnx: {what} {tensor.name!r} points to an external file; "
                            "the deploy dir's model.onnx must be self-contained")
    dims = _bounded(tensor.dims, f"{what} {tensor.name!r}")
    try:
        return numpy_helper.to_array(tensor).reshape(dims)
    except (ValueError, TypeError) as err:
        raise ManifestError(f"model.onnx: {what} {tensor.name!r} is damaged ({err})") from None


def read_sparse(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer densified, its dims and indices bounded and checked first."""
    name = sparse.values.name
    dims = _bounded(sparse.dims, f"sparse initializer {name!r}")
    size = math.prod(dims)
    values = _tensor(sparse.values, "sparse initializer").reshape(-1)
    indices = _tensor(sparse.indices, "sparse initializer indices").astype(np.int64)
    if indices.ndim == 2 and indices.shape[1] == len(dims) and len(dims) > 0:
        if (indices < 0).any() or (indices >= np.array(dims)).any():
            raise ManifestError(f"model.onnx: sparse initializer {name!r} has an index out of "
                                f"its dims {dims}; re-export the run")
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    indices = indices.reshape(-1)
    if len(indices) != len(values) or (len(indices) and
                                       (indices.min() < 0 or indices.max() >= size)):
        raise ManifestError(f"model.onnx: sparse initializer {name!r} has {len(values)} values "
                            f"for {len(indices)} indices within {size}; re-export the run")
    dense = np.zeros(size, values.dtype)
    dense[indices] = values
    return dense.reshape(dims)


def read_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer, dense and sparse, as numpy arrays."""
    constants = {init.name: _tensor(init, "initializer") for init in graph.initializer}
    for sparse in graph.sparse_initializer:
        constants[sparse.values.name] = read_sparse(sparse)
    return constants


def check_against_manifest(model: onnx.ModelProto, info: dict) -> None:
    """The sparse initializers' count and nonzeros are the ones export recorded."""
    recorded = info.get("sparse_initializers")
    if not isinstance(recorded, dict):
        return
    graph = model.graph
    found = {"sparse": len(graph.sparse_initializer),
             "nonzeros": sum(math.prod(s.values.dims) for s in graph.sparse_initializer)}
    for key, value in found.items():
        if key in recorded and recorded[key] != value:
            raise ManifestError(f"model.onnx has {value} sparse-initializer {key}, the manifest "
                                f"records {recorded[key]}; re-export the run")


def load_sparse(deploy_dir: str | Path, threads: int = 1,
                dense_threshold: float = DENSE_THRESHOLD,
                verify_key: str | Path | None = None, model_spec: str | None = None,
                trust_model_code: bool = False) -> SparseModel:
    """An irregular deploy dir as a callable: float32 NCHW images in [0, 1] -> (N, classes).

    `verify_key`: a public key (PEM); the deploy dir must carry a valid signature from its
    private key over every file (`dnr_deploy.deploydir.signing`), checked before anything is
    parsed. Without it, one `SignatureNotice` says the dir is unsigned or was not checked.

    `model_spec`, `trust_model_code`: accepted as `load_deployed_model` takes them, and unused:
    the graph comes from model.onnx, so no MODULE:FACTORY code is ever imported here.

    Raises:
        NotIrregularError: a channel or dense deploy dir (nothing sparse to run).
        ManifestError: not a deploy dir, a file that fails its sha256, or a model.onnx that
            disagrees with the manifest or claims sizes over the bounds.
        SignatureError (a ManifestError): with `verify_key`, no valid signature.
        UnsupportedLayerError: an op the engine has no step for.
    """
    folder = Path(deploy_dir)
    info = signing.checked_manifest(folder, verify_key, names.CSR_FILE, lambda info: (
        NotIrregularError(
            f"the sparse runtime runs irregular deploy dirs; {str(deploy_dir)!r} is a "
            f"{info.get('granularity') or 'dense'} export without {names.CSR_FILE}: "
            "use --runtime ort")))
    try:
        model = onnx.load(str(folder / names.MODEL_FILE), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: a damaged file
        raise ManifestError(f"{names.MODEL_FILE} cannot be read ({err})") from None
    check_against_manifest(model, info)
    return build_from_onnx(model, [int(n) for n in info["input_shape"]], threads,
                           dense_threshold)


def build_from_onnx(model: onnx.ModelProto, input_shape: list[int], threads: int = 1,
                    dense_threshold: float = DENSE_THRESHOLD) -> SparseModel:
    """The steps of an ONNX CNN with one float32 NCHW input and one output.

    Raises:
        UnsupportedLayerError: an op, attribute or layout without a step (named).
    """
    reader = GraphReader(model.graph, read_constants(model.graph), dense_threshold,
                         input_shape[0])
    steps = fold_normalization(reader.read())
    link_convs(steps)
    layers = _layer_sizes(SparseModel(steps, reader.output, [], 1), input_shape)
    return SparseModel(steps, reader.output, layers, threads)


def _layer_sizes(model: SparseModel, input_shape: list[int]) -> list:
    """(layer, input height and width) of every conv, from one run on a blank image."""
    values: dict = {None: np.zeros((*input_shape, 1), np.float32)}
    layers = []
    for key, step, inputs, takes_threads in model._plan:
        args = [values[i] for i in inputs]
        conv = step.conv if isinstance(step, LinearStep) else step
        if isinstance(conv, SparseConv):
            layers.append((conv, (1, 1) if conv is not step else args[0].shape[1:3]))
        values[key] = step(*args, threads=1) if takes_threads else step(*args)
    return layers

