"""A CPU runtime for irregular deploy dirs: convolutions straight from the CSR weights."""

from dnr_deploy.runtime.sparse.executor import (
                                                NotIrregularError,
                                                SparseModel,
                                                build_sparse_model,
                                                load_sparse,
)
from dnr_deploy.runtime.sparse.plan import DENSE_THRESHOLD, UnsupportedLayerError

__all__ = ["DENSE_THRESHOLD", "NotIrregularError", "SparseModel", "UnsupportedLayerError",
           "build_sparse_model", "load_sparse"]
