"""Irregular export: exact CSR bundle within its size bound, sparse-initializer ONNX, the loader."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dnr_deploy import data
from dnr_deploy.deploydir import manifest, names
from dnr_deploy.export import ExportConfig, csr, export_run, load_deployed_model, load_source
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.models import create_model
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks
from tests.factories import randomize_norms, write_fake_run


def masked_resnet(density: float) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
    randomize_norms(model, torch.Generator().manual_seed(0))
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    masks = random_masks(weights, density, torch.Generator().manual_seed(0))
    apply_masks(model, masks)
    return model, masks


def test_weight_to_csr_layout_matches_docstring_example():
    weight = torch.tensor([[[[0.0, 5.0, 0.0]]], [[[7.0, 0.0, 0.0]]]])
    matrix = csr.weight_to_csr(weight)
    assert matrix.shape == (2, 3)
    np.testing.assert_array_equal(matrix.data, [5.0, 7.0])
    np.testing.assert_array_equal(matrix.indices, [1, 0])
    np.testing.assert_array_equal(matrix.indptr, [0, 1, 2])
    assert matrix.indices.dtype == np.int32 and matrix.indptr.dtype == np.int32
    assert torch.equal(csr.csr_to_weight(matrix, tuple(weight.shape)), weight)


def test_csr_bundle_round_trip_exact_and_within_size_bound(tmp_path):
    model, masks = masked_resnet(0.05)
    state = model.state_dict()
    path = tmp_path / names.CSR_FILE
    header = {"model": {"name": "resnet18", "num_classes": 10, "in_chans": 3}}
    stats = csr.write_csr_bundle(path, state, sorted(masks), header)

    assert stats.nonzeros == sum(int(m.sum()) for m in masks.values())
    # float32 values + int32 indices: 8 B per nonzero, <= 8.5 with all headers and the dense
    # tensors (norms, classifier bias) included.
    assert stats.bytes == path.stat().st_size
    assert stats.bytes <= 8.5 * stats.nonzeros + 4 * stats.row_pointers, stats
    with np.load(path, allow_pickle=False) as npz:
        assert npz["csr/1.layers.0.conv1.weight/indices"].dtype == np.int32
        assert npz["csr/1.layers.0.conv1.weight/data"].dtype == np.float32

    read_header, restored = csr.read_csr_bundle(path)
    assert read_header["model"] == header["model"]
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name


def test_sparse_onnx_is_small_valid_and_exact(tmp_path):
    model, masks = masked_resnet(0.05)
    example = torch.zeros(1, 3, 32, 32)
    dense, sparse = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    onnx_io.export_onnx(model, example, dense, opset=18)
    sparse.write_bytes(dense.read_bytes())
    counts = onnx_io.sparsify_initializers(sparse, set(masks))

    assert counts["sparse"] == len(masks) and counts["kept_dense"] == 0
    assert sparse.stat().st_size < 0.15 * dense.stat().st_size
    graph = onnx.load(str(sparse)).graph
    assert {s.values.name for s in graph.sparse_initializer} == set(masks)
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in graph.sparse_initializer)
    onnx_io.check_onnx(sparse)

    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = onnx_io.torch_logits(model, x)
    sparse_out = onnx_io.run_session(onnx_io.open_session(sparse), x)
    dense_out = onnx_io.run_session(onnx_io.open_session(dense), x)
    np.testing.assert_array_equal(sparse_out, dense_out)  # ORT densifies: bitwise equal
    assert onnx_io.compare_logits(reference, sparse_out).passes(1e-4)


def test_nearly_dense_weight_stays_dense(tmp_path):
    model = create_model("small", 10, 1, (0.3,), (0.4,)).eval()
    masks = {name: torch.ones_like(w, dtype=torch.bool)
             for name, w in prunable_weights(model).items()}
    path = tmp_path / "m.onnx"
    onnx_io.export_onnx(model, torch.zeros(1, 1, 8, 8), path, opset=18)
    before = path.stat().st_size
    counts = onnx_io.sparsify_initializers(path, set(masks))
    assert counts["sparse"] == 0 and counts["kept_dense"] == len(masks)
    assert path.stat().st_size <= before


def test_export_run_irregular_writes_checked_deploy_dir(tmp_path):
    run_dir = tmp_path / "run"
    run = write_fake_run(run_dir, "irregular")
    result = export_run(ExportConfig(run_dir=str(run_dir), baseline=True, parity_samples=64))

    deploy = run_dir / "deploy"
    assert result.dir == deploy
    info = manifest.load_manifest(deploy)
    manifest.verify_files(deploy, info)
    assert set(info["files"]) == {"model.onnx", "baseline.onnx", "weights.csr.npz"}
    assert info["format"] == "dnr-deploy/deploy/1"
    assert info["source_run"]["checkpoint_sha256"] == run["checkpoint_sha256"]
    assert info["params"] == run["params"] and info["macs"] == run["macs"]
    assert info["accuracy"] == run["accuracy"] and info["threat_model"] == run["threat_model"]
    parity = info["parity"]
    assert parity["onnx_vs_torch_max_abs"] <= 1e-4 and parity["argmax_agree"] == 64
    assert parity["csr_round_trip_exact"] is True
    limit = parity["limit"]  # what the gate held ONNX Runtime to, and the rounding it measured
    assert 0 <= limit["float32_rounding"] < 1e-4 and limit["limit"] >= limit["atol"] == 1e-4
    files = info["files"]
    assert files["model.onnx"]["bytes"] < 0.15 * files["baseline.onnx"]["bytes"]

    x, _ = data.test_subset(data.load_data("digits"), 50)  # data.: pytest collects test_*
    masked = load_source(run_dir).model
    loaded = load_deployed_model(deploy)
    np.testing.assert_array_equal(onnx_io.torch_logits(loaded, x),
                                  onnx_io.torch_logits(masked, x))
    session = onnx_io.open_session(deploy / "model.onnx")
    ort_out = onnx_io.run_session(session, x)
    assert onnx_io.compare_logits(onnx_io.torch_logits(masked, x), ort_out).passes(1e-4)


def test_csr_format_writes_the_bundle_alone(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    out = tmp_path / "csr_only"
    export_run(ExportConfig(run_dir=str(run_dir), out=str(out), format="csr"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.csr.npz"]
    x = torch.rand(4, 1, 8, 8)
    np.testing.assert_array_equal(onnx_io.torch_logits(load_deployed_model(out), x),
                                  onnx_io.torch_logits(load_source(run_dir).model, x))


def test_loader_refuses_a_tampered_file(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    out = tmp_path / "d"
    export_run(ExportConfig(run_dir=str(run_dir), out=str(out), format="csr"))
    bundle = out / names.CSR_FILE
    content = bytearray(bundle.read_bytes())
    content[len(content) // 2] ^= 0xFF
    bundle.write_bytes(bytes(content))
    with pytest.raises(manifest.ManifestError, match="sha256"):
        load_deployed_model(out)
    with pytest.raises(manifest.ManifestError, match="not a deploy dir"):
        load_deployed_model(tmp_path)


def test_weights_over_the_onnx_limit_go_through_external_data_and_come_back_sparse(
        tmp_path, monkeypatch):
    """Over protobuf's 2 GiB (here: a limit lowered below the small net's weights) the dense
    export writes external data, and the sparse fold puts the nonzeros back into one file."""
    from dnr_deploy.export import deploy as deploy_module

    monkeypatch.setattr(deploy_module, "ONNX_WEIGHT_LIMIT_BYTES", 10_000)
    written, real_export = [], onnx_io.export_onnx

    def recording_export(*args, **kwargs):
        written.append(kwargs.get("external_data"))
        real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_io, "export_onnx", recording_export)
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "irregular")
    export_run(ExportConfig(run_dir=str(run_dir), parity_samples=32))
    assert written == [True]  # the external-data path ran, not the ordinary one
    deploy = run_dir / "deploy"
    assert sorted(p.name for p in deploy.iterdir()) == [
        "manifest.json", "model.onnx", "weights.csr.npz"]  # no external data file left
    model = onnx.load(str(deploy / "model.onnx"), load_external_data=False)
    assert model.graph.sparse_initializer
    assert all(init.data_location != onnx.TensorProto.EXTERNAL
               for init in model.graph.initializer)
    x, _ = data.test_subset(data.load_data("digits"), 32)
    masked = load_source(run_dir).model
    ort_out = onnx_io.run_session(onnx_io.open_session(deploy / "model.onnx"), x)
    assert onnx_io.compare_logits(onnx_io.torch_logits(masked, x), ort_out).passes(1e-4)
