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
           "build_from_onnx", "build_sparse_model", "load_deploy_dir", "load_sparse"]


def load_deploy_dir(deploy_dir, threads: int = 1, verify_key=None, model_spec: str | None = None,
                    trust_model_code: bool = False):
    """An irregular deploy dir's runner: `Int8Graph` on weights.int8.npz for an int8 export,
    the float engine (`load_sparse`) otherwise. Both are checked before parsing; see them for
    what they raise."""
    from pathlib import Path

    from dnr_deploy.export.sparse_int8 import INT8_CSR_FILE
    from dnr_deploy.runtime.sparse.int8_graph import load_int8_graph

    if (Path(deploy_dir) / INT8_CSR_FILE).exists():
        return load_int8_graph(deploy_dir, threads, verify_key)
    return load_sparse(deploy_dir, threads=threads, verify_key=verify_key,
                       model_spec=model_spec, trust_model_code=trust_model_code)


def __getattr__(name: str):
    if name == "build_sparse_model":  # PEP 562: torch only for who asks for the fx front end
        return importlib.import_module("dnr_deploy.runtime.sparse.executor").build_sparse_model
    raise AttributeError(f"module 'dnr_deploy.runtime.sparse' has no attribute {name!r}")
