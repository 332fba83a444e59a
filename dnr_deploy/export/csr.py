"""The CSR bundle of an irregular run: every prunable weight as scipy CSR, plus the rest.

A weight of shape (out, in, kh, kw) is stored as a CSR matrix of out x in*kh*kw: float32 data,
int32 column indices, int32 row pointers. That is 8 bytes per nonzero plus the row pointers;
the bundle also holds every other tensor of the state dict (biases, norms, normalization) and a
JSON header naming the architecture, so `read_csr_bundle` alone rebuilds the model.

Layout inside `weights.csr.npz` (np.savez_compressed; arrays only, read with allow_pickle=False):

    header            uint8   UTF-8 JSON: format, model, input_shape, mean, std, sparse shapes
    csr/<name>/data   float32 nonzero values, row by row
    csr/<name>/indices int32  their column in the out x in*kh*kw matrix
    csr/<name>/indptr  int32  row r spans data[indptr[r]:indptr[r + 1]]
    dense/<name>      any     every other state-dict tensor, as is

Deflate shrinks the int32 column indices (their high bytes are mostly zero) and the npy
headers, which pays for the dense tensors: the whole file stays under 8.5 bytes per nonzero
plus the row pointers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from dnr_deploy.checkpoint import write_atomic

CSR_NAME = "weights.csr.npz"
CSR_FORMAT = "dnr-deploy/csr/1"
INDEX_DTYPE = np.int32  # 4 bytes: layers up to 2**31 - 1 columns, i.e. all of this project's


class CsrError(ValueError):
    """A CSR bundle that is missing, unreadable, or not what `write_csr_bundle` writes."""


@dataclass(frozen=True)
class CsrStats:
    """Sizes of a written bundle: nonzeros, row pointers, file bytes."""

    nonzeros: int
    row_pointers: int
    bytes: int


def weight_to_csr(weight: torch.Tensor) -> scipy.sparse.csr_array:
    """`weight` (out, ...) as an out x rest CSR matrix with int32 indices; zeros dropped.

    Example: a (2, 1, 1, 3) conv weight [[[[0, 5, 0]]], [[[7, 0, 0]]]] becomes data [5, 7],
    indices [1, 0], indptr [0, 1, 2] over a 2 x 3 matrix.
    """
    matrix = weight.detach().cpu().reshape(weight.shape[0], -1).numpy().astype(np.float32)
    rows, cols = np.nonzero(matrix)  # row-major order: exactly CSR's
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=indptr[1:])
    return scipy.sparse.csr_array(
        (matrix[rows, cols], cols.astype(INDEX_DTYPE), indptr.astype(INDEX_DTYPE)),
        shape=matrix.shape,
    )


def csr_to_weight(matrix: scipy.sparse.csr_array, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of `shape` that `weight_to_csr` encoded."""
    return torch.from_numpy(matrix.toarray().astype(np.float32).reshape(shape))


def write_csr_bundle(
    path: Path, state: dict[str, torch.Tensor], sparse_names: list[str], header: dict
) -> CsrStats:
    """Write `state` with `sparse_names` as CSR and everything else dense, atomically.

    Args:
        path: the bundle file to create.
        state: a full state dict (masked weights hold exact zeros).
        sparse_names: the prunable weights to store as CSR.
        header: JSON-able facts needed to rebuild the model ("model", "input_shape", ...).

    Raises:
        CsrError: a sparse name missing from `state`.
    """
    missing = sorted(set(sparse_names) - set(state))
    if missing:
        raise CsrError(f"weights to store as CSR are not in the state dict: {missing}")
    arrays: dict[str, np.ndarray] = {}
    shapes, nonzeros, row_pointers = {}, 0, 0
    for name in sparse_names:
        matrix = weight_to_csr(state[name])
        arrays[f"csr/{name}/data"] = matrix.data
        arrays[f"csr/{name}/indices"] = matrix.indices
        arrays[f"csr/{name}/indptr"] = matrix.indptr
        shapes[name] = list(state[name].shape)
        nonzeros += matrix.nnz
        row_pointers += matrix.indptr.size
    for name, tensor in state.items():
        if name not in shapes:
            arrays[f"dense/{name}"] = tensor.detach().cpu().numpy()
    meta = {"format": CSR_FORMAT, **header, "sparse_shapes": shapes}
    arrays["header"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomic(path, lambda tmp: _savez_compressed(tmp, arrays))
    return CsrStats(nonzeros, row_pointers, path.stat().st_size)


def _savez_compressed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to a name
        np.savez_compressed(file, **arrays)


def read_csr_bundle(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the full dense state dict of a bundle, without unpickling anything.

    Raises:
        CsrError: missing or unreadable file, wrong format, or inconsistent CSR arrays.
    """
    if not Path(path).is_file():
        raise CsrError(f"no CSR bundle at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as err:
        raise CsrError(f"cannot read CSR bundle {str(path)!r}: {err}") from None
    if not isinstance(header, dict) or header.get("format") != CSR_FORMAT:
        raise CsrError(f"{str(path)!r} is not a dnr-deploy CSR bundle ({CSR_FORMAT})")
    state = {
        name.removeprefix("dense/"): torch.from_numpy(array.copy())
        for name, array in arrays.items() if name.startswith("dense/")
    }
    for name, shape in header["sparse_shapes"].items():
        try:
            parts = (arrays[f"csr/{name}/{key}"] for key in ("data", "indices", "indptr"))
            matrix = scipy.sparse.csr_array(tuple(parts),
                                            shape=(shape[0], math.prod(shape[1:])))
            matrix.check_format(full_check=True)
        except (KeyError, ValueError) as err:
            raise CsrError(f"CSR bundle {str(path)!r}: weight {name!r} is damaged: {err}") from None
        state[name] = csr_to_weight(matrix, tuple(shape))
    return header, state
