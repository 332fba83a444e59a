"""A CPU runtime for irregular deploy dirs: convolutions straight from the sparse weights.

`load_sparse` reads model.onnx with numpy and onnx only (no PyTorch); `build_sparse_model`
traces an in-memory PyTorch module instead (imported on first use: it needs torch).
"""

from __future__ import annotations

import importlib

from dnr_deploy.runtime.sparse.model import NotIrregularError, SparseModel
from dnr_deploy.runtime.sparse.onnx_graph import build_from_onnx, load_sparse
from dnr_deploy.runtime.sparse.plan import DENSE_THRESHOLD, UnsupportedLayerError

__all__ = ["DENSE_THRESHOLD", "NotIrregularError", "SparseModel", "UnsupportedLayerError",
           "build_from_onnx", "build_sparse_model", "load_sparse"]


def __getattr__(name: str):
    if name == "build_sparse_model":  # PEP 562: torch only for who asks for the fx front end
        return importlib.import_module("dnr_deploy.runtime.sparse.executor").build_sparse_model
    raise AttributeError(f"module 'dnr_deploy.runtime.sparse' has no attribute {name!r}")
