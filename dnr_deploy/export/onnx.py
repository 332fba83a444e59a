"""ONNX files: export with a dynamic batch, sparse initializers, ONNX Runtime sessions, parity.

The graph's input is "input" (float32 NCHW in [0, 1]; normalization is inside the graph) and its
output "logits". Measured facts behind the choices here are in DESIGN.md section 7.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from torch import nn

from dnr_deploy.deploydir.names import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class Parity:
    """How far one model's logits are from a reference's on the same images."""

    max_abs: float
    argmax_agree: int
    n_images: int

    def passes(self, atol: float) -> bool:
        return self.max_abs <= atol and self.argmax_agree == self.n_images

    def as_dict(self) -> dict:
        return asdict(self)


# protobuf's hard limit on one message, so on an ONNX file that keeps its weights inside it
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers an ONNX export stores as initializers."""
    return sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, opset: int,
                external_data: bool = False) -> None:
    """Write `model` (in eval mode) as an ONNX file with a dynamic batch axis: self-contained,
    or with `external_data` its weights in `<path>.data` beside it (over protobuf's 2 GiB; an
    irregular export then folds them back in as sparse initializers).

    The dynamo exporter fixes the batch at the example's size unless told otherwise, and
    torch.export specializes a size-1 dimension, so the example is repeated to a batch of 2.
    The exporter folds each BatchNorm into the conv before it and keeps the conv's weight name,
    which is what lets `sparsify_initializers` find the pruned weights by parameter name.
    """
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, external_data=external_data,
            opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    finally:
        model.train(was_training)
    program.save(str(path), external_data=external_data)


def sparsify_initializers(path: Path, names: set[str]) -> dict[str, int]:
    """Rewrite the initializers named in `names` as ONNX sparse tensors, in place.

    This is the last step of an irregular export (after the exporter's own optimizations,
    which would not keep sparse tensors). Values stay float32 and the indices are linearized
    positions stored in the INT64 `int64_data` field that the ONNX checker requires; protobuf
    packs that field as varints, so an index costs 1-4 bytes instead of 8. A weight is kept
    dense when its sparse form would be larger (a layer DNR left near fully dense).

    Returns:
        Counts: "sparse" initializers converted, "kept_dense" named ones left dense, "nonzeros".
    """
    model = onnx.load(str(path), load_external_data=False)
    external_files = {entry.value for init in model.graph.initializer
                      if init.data_location == TensorProto.EXTERNAL
                      for entry in init.external_data if entry.key == "location"}
    load_external_data_for_model(model, str(path.parent))
    kept, sparse = [], []
    counts = {"sparse": 0, "kept_dense": 0, "nonzeros": 0}
    for init in model.graph.initializer:
        candidate = _as_sparse(init) if init.name in names else None
        if candidate is not None and candidate.ByteSize() < init.ByteSize():
            sparse.append(candidate)
            counts["sparse"] += 1
            counts["nonzeros"] += int(candidate.values.dims[0])
        else:
            kept.append(init)
            counts["kept_dense"] += int(init.name in names)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.sparse_initializer.extend(sparse)
    if model.ByteSize() > PROTOBUF_LIMIT_BYTES:
        raise ValueError(f"{model.ByteSize() / 2**30:.2f} GiB even with sparse weights, over "
                         "the 2 GiB an ONNX file holds without external data")
    tmp = path.with_name(f".{path.name}.sparse.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for name in external_files:  # now inside the file
        (path.parent / name).unlink(missing_ok=True)
    return counts


def _as_sparse(init: onnx.TensorProto) -> onnx.SparseTensorProto:
    array = numpy_helper.to_array(init)
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)  # ascending, as the ONNX spec requires
    values = numpy_helper.from_array(flat[positions], init.name)
    indices = TensorProto(name=f"{init.name}_indices", data_type=TensorProto.INT64,
                          dims=[positions.size])
    indices.int64_data.extend(positions.tolist())
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def check_onnx(path: Path) -> None:
    """onnx.checker on the file; full shape inference too unless it holds sparse initializers.

    `full_check=True` rejects a sparse tensor feeding a Conv weight although ONNX Runtime runs
    it bit-exactly (DESIGN.md section 7), so sparse files get the structural check only.

    Raises:
        onnx.checker.ValidationError: the file is not valid ONNX.
    """
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)


def open_session(path: str | Path) -> ort.InferenceSession:
    """The session export's parity gate checks: `runtime.session.create_session`'s, the very
    configuration bench and verify deploy (CPU, one intra-op thread, all optimizations)."""
    from dnr_deploy.runtime.session import create_session

    return create_session(path)[0]


def run_session(
    session: ort.InferenceSession, x: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Logits of `x` (float32 NCHW in [0, 1]) from `session`, in batches."""
    from dnr_deploy.runtime.session import run_logits

    return run_logits(session, x.detach().cpu().numpy(), batch_size)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Max |difference| and how many images get the same top class."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    agree = int((reference.argmax(axis=1) == candidate.argmax(axis=1)).sum())
    return Parity(float(diff.max()) if diff.size else 0.0, agree, int(reference.shape[0]))


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of `x` from a PyTorch model in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [model(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy()
