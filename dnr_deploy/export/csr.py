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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from dnr_deploy.compress.checkpoint import write_atomic

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


def read_csr_bundle(
    path: Path, expected: dict[str, tuple[int, ...]] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the full dense state dict of a bundle, without unpickling anything.

    Args:
        path: the bundle.
        expected: the state-dict shapes of the model the bundle is for. Given (the deploy-dir
            loader gives them), every tensor must be there with exactly that shape, and the
            archive may not inflate beyond what such weights need; both are checked before
            anything is inflated or densified, so a hostile file cannot make the reader
            allocate more than the model itself.

    Raises:
        CsrError: missing or unreadable file, wrong format, arrays or shapes that do not fit
            each other or `expected`.
    """
    path = Path(path)
    if not path.is_file():
        raise CsrError(f"no CSR bundle at {str(path)!r}")
    check = None if expected is None else inflate_limit(weights_bytes_limit(expected))
    try:
        arrays = read_npz(path, check)
        header = json.loads(arrays.pop("header").tobytes().decode())
    except KeyError:
        raise CsrError(f"CSR bundle {str(path)!r} has no header; re-export the run") from None
    except (NpzError, ValueError, RecursionError) as err:
        raise CsrError(f"cannot read CSR bundle {str(path)!r}: {err}") from None
    shapes = header.get("sparse_shapes") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("format") != CSR_FORMAT or not (
            isinstance(shapes, dict) and all(map(_valid_shape, shapes.values()))):
        raise CsrError(f"{str(path)!r} is not a dnr-deploy CSR bundle ({CSR_FORMAT})")
    dense = {name.removeprefix("dense/"): array for name, array in arrays.items()
             if name.startswith("dense/")}
    if expected is not None:
        _check_expected(path, expected, shapes, dense)
    state = {}
    for name, array in dense.items():
        if array.dtype.kind not in "biuf":
            raise CsrError(f"CSR bundle {str(path)!r}: tensor {name!r} is {array.dtype}, "
                           "not a number type")
        state[name] = torch.from_numpy(array.copy())
    for name, shape in shapes.items():
        state[name] = csr_to_weight(_csr_matrix(path, arrays, name, shape), tuple(shape))
    return header, state


_MAX_DIM = np.iinfo(INDEX_DTYPE).max


class NpzError(ValueError):
    """An .npz archive that cannot be read (damaged, truncated, pickled, not an archive)."""


def read_npz(path: Path, check: Callable[[Any], None] | None = None) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, never unpickling anything (allow_pickle=False).

    Args:
        path: the archive.
        check: called with the open archive before any array is inflated (may raise).

    Raises:
        NpzError: not an archive, or one that numpy cannot read; one line saying why.
    """
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":  # np.load would take other bytes as .npy or pickle
            raise NpzError(f"{str(path)!r} is not an .npz archive")
    try:
        # numpy's .npy header parser warns about the damaged headers it then rejects; the
        # error says it, so warnings are passed on only when the archive reads.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with np.load(path, allow_pickle=False) as npz:
                if check is not None:
                    check(npz)
                arrays = {name: npz[name] for name in npz.files}
    except NpzError:  # from `check`
        raise
    except Exception as err:  # the .npy header parser alone raises ValueError, SyntaxError,
        # tokenize.TokenError; zipfile, zlib and the OS add theirs: all mean "unusable"
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise NpzError(reason) from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)
    return arrays


def _valid_shape(shape: object) -> bool:
    return isinstance(shape, list) and len(shape) >= 2 and all(
        isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= _MAX_DIM for n in shape)


def weights_bytes_limit(shapes: dict[str, tuple[int, ...]]) -> int:
    """The most an archive of these tensors can need inflated: 8 bytes per value (float64, or
    CSR's float32 value + int32 index; twice that for margin) plus row pointers and headers."""
    return 16 * sum(math.prod(shape) for shape in shapes.values()) + (1 << 20)


def inflate_limit(max_bytes: int) -> Callable[[Any], None]:
    """A `read_npz` check that refuses an archive whose members would inflate beyond
    `max_bytes` (a zip bomb), before any of them is read."""
    def check(npz) -> None:
        inflated = sum(info.file_size for info in npz.zip.infolist())
        if inflated > max_bytes:
            raise NpzError(f"it would inflate to {inflated:,} bytes, more than its model's "
                           f"weights can take ({max_bytes:,}); refusing to read it")
    return check


def _check_expected(path: Path, expected: dict, shapes: dict, dense: dict) -> None:
    found = {**{name: tuple(shape) for name, shape in shapes.items()},
             **{name: array.shape for name, array in dense.items()}}
    if found != {name: tuple(shape) for name, shape in expected.items()}:
        wrong = sorted(n for n in set(found) | set(expected)
                       if found.get(n) != (tuple(expected[n]) if n in expected else None))
        raise CsrError(f"CSR bundle {str(path)!r} does not fit the model: tensors "
                       f"{wrong[:3]} are missing, unknown or of another shape")


def _csr_matrix(path: Path, arrays: dict, name: str, shape: list[int]) -> scipy.sparse.csr_array:
    """One weight's CSR arrays as a checked matrix (index bounds, row pointers, sorting)."""
    try:
        data, indices, indptr = (arrays[f"csr/{name}/{key}"]
                                 for key in ("data", "indices", "indptr"))
        if data.dtype.kind != "f" or indices.dtype.kind not in "iu" or \
                indptr.dtype.kind not in "iu" or data.ndim != 1:
            raise ValueError(f"arrays of types {data.dtype}, {indices.dtype}, {indptr.dtype}")
        matrix = scipy.sparse.csr_array((data, indices, indptr),
                                        shape=(shape[0], math.prod(shape[1:])))
        matrix.check_format(full_check=True)
    except (KeyError, ValueError, TypeError, OverflowError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CsrError(f"CSR bundle {str(path)!r}: weight {name!r} is damaged: {reason}") \
            from None
    return matrix
