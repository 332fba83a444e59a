"""The manifest tells the truth about the deploy dir: format, fields, hashes, the I/O contract."""

from __future__ import annotations

import numpy as np
import onnx

from dnr_deploy.deploydir.manifest import MANIFEST_FORMAT, MANIFEST_NAME, verify_files
from dnr_deploy.runtime.session import create_session, run_logits

GRANULARITIES = {"irregular", "channel", "dense"}


def test_format_and_fields(deploy):
    m = deploy.manifest
    assert m["format"] == MANIFEST_FORMAT
    assert set(m["model"]) >= {"name", "num_classes", "in_chans"}
    assert len(m["input_shape"]) == 3 and m["input_shape"][0] == m["model"]["in_chans"]
    assert m["num_classes"] == m["model"]["num_classes"]
    assert list(m.get("input_range", [0.0, 1.0])) == [0.0, 1.0]
    assert m["granularity"] in GRANULARITIES
    assert m["threat_model"]["norm"] == "Linf" and 0 < m["threat_model"]["eps"] <= 1
    accuracy = m["accuracy"]
    assert set(accuracy) >= {"clean", "fgsm", "pgd7", "pgd20", "autoattack"}
    assert all(0 <= value <= 1 for value in accuracy.values())
    assert accuracy["autoattack"] <= accuracy["pgd20"] + 0.01 <= accuracy["clean"] + 0.01
    assert m["robustness"]["robust"] == accuracy["autoattack"]
    assert 0 < m["params"]["deployed"] <= m["params"]["dense"]
    assert 0 < m["macs"]["nonzero"] <= m["macs"]["executed"] <= m["macs"]["dense"]
    assert "model.onnx" in m["files"]
    assert m["opset"] >= 17 and "onnxruntime" in m["versions"]


def test_every_file_hashed_and_none_unlisted(deploy):
    verify_files(deploy.path, deploy.manifest)
    on_disk = {p.name for p in deploy.path.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    assert on_disk == set(deploy.manifest["files"])  # report folders are not files


def test_onnx_io_contract_and_dynamic_batch(deploy):
    session, _ = create_session(deploy.path / "model.onnx")
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert list(inp.shape[1:]) == list(deploy.manifest["input_shape"])
    assert not isinstance(inp.shape[0], int)  # symbolic: any batch size
    assert "logits" in [o.name for o in outputs]
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, *deploy.manifest["input_shape"]),
                                                dtype=np.float32)
        logits = run_logits(session, x)
        assert logits.shape == (batch, deploy.manifest["num_classes"])
        assert np.isfinite(logits).all()


def test_irregular_artifacts_are_sparse(deploy):
    if deploy.manifest["granularity"] != "irregular":
        return
    assert "weights.csr.npz" in deploy.manifest["files"]
    model = onnx.load(str(deploy.path / "model.onnx"))
    assert len(model.graph.sparse_initializer) == deploy.manifest["sparse_initializers"]["sparse"]
