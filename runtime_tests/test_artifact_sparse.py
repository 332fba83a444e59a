"""The sparse runtime computes the deployed function: its logits match ONNX Runtime's on the
test images within the parity gate, with the same argmax (irregular deploy dirs only)."""

from __future__ import annotations

import numpy as np
import pytest

from dnr_deploy.runtime.runtimes import PARITY_ATOL
from dnr_deploy.runtime.session import create_session, run_logits


def test_sparse_runtime_equals_onnx_runtime(deploy, test_images):
    if "weights.csr.npz" not in deploy.manifest["files"]:
        pytest.skip("not an irregular deploy dir: the sparse runtime does not apply")
    from dnr_deploy.runtime.sparse import load_sparse

    x = test_images[0].numpy().astype(np.float32)
    session, _ = create_session(deploy.path / "model.onnx")
    ort = run_logits(session, x)
    sparse = run_logits(load_sparse(deploy.path), x)
    assert np.abs(sparse - ort).max() <= PARITY_ATOL
    assert (sparse.argmax(1) == ort.argmax(1)).all()
