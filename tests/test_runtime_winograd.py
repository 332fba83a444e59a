"""Winograd F(4x4, 3x3) in the sparse engine: the transforms against torch on every code path
this CPU runs, the rule that picks it, and whole networks that use it against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnr_deploy.export.onnx import export_onnx
from dnr_deploy.runtime.bench import _runtime_line
from dnr_deploy.runtime.runtimes import PARITY_ATOL, Runtime
from dnr_deploy.runtime.session import create_session, run_logits
from dnr_deploy.runtime.sparse import build_sparse_model, native, winograd
from dnr_deploy.runtime.sparse.plan import SparseConv
from tests.factories import masked_paper_model

pytestmark = pytest.mark.skipif(not native.winograd_available(),
                                reason="the compiled Winograd transforms are not built")


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, residual, relu: bool):
    """conv3x3(pad 1) + bias (+ residual), ReLU, in float64, CHWN in and out."""
    nchw = torch.from_numpy(x.transpose(3, 0, 1, 2).astype(np.float64))
    y = F.conv2d(nchw, torch.from_numpy(weight.astype(np.float64)),
                 torch.from_numpy(bias.astype(np.float64)), padding=1).numpy()
    y = y.transpose(1, 2, 3, 0)
    if residual is not None:
        y = y + residual
    return np.maximum(y, 0.0) if relu else y


# (in, out channels, height, width, images): whole 16-, 8- and 4-float lanes, a batch of 3 (one
# float at a time), a non-square map, more tiles than a GEMM block holds; single images, whose
# lanes are runs of tiles: 3 a row (one at a time), 5 (4 + 1), 8, and 20 a row over two GEMM
# blocks (16 + 4 with AVX-512, 8 + 8 + 4 without; runs cut where a block ends)
CASES = [(16, 24, 8, 12, 16), (32, 16, 16, 16, 8), (8, 8, 4, 8, 3), (16, 8, 8, 8, 4),
         (64, 32, 32, 32, 8), (16, 24, 8, 12, 1), (16, 8, 8, 20, 1), (64, 32, 32, 32, 1),
         (8, 8, 16, 80, 1)]


@pytest.mark.parametrize("path", native.winograd_paths())
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}x{c[3]}-n{c[4]}"
                                              for c in CASES])
@pytest.mark.parametrize("relu,with_residual", [(True, True), (False, False)])
@pytest.mark.parametrize("threads", [1, 2])  # 2: the GEMMs shared among threads too
def test_transforms_match_torch_on_every_path(path, case, relu, with_residual, threads):
    chans, out_chans, height, width, batch = case
    rng = np.random.default_rng(sum(case))
    weight = (rng.standard_normal((out_chans, chans, 3, 3)) * 0.1).astype(np.float32)
    weight *= rng.random(weight.shape) < 0.4
    bias = rng.standard_normal(out_chans).astype(np.float32)
    x = rng.standard_normal((chans, height, width, batch)).astype(np.float32)
    # input planes with one column of slack, output rows wider than the map (as when a
    # layer writes into the next one's planes): the strides must be honoured, not assumed
    planes = np.zeros((chans, height + 2, width + 3, batch), np.float32)
    planes[:, 1:height + 1, 1:width + 1] = x
    row = (width + 5) * batch
    out = np.full(out_chans * height * row, np.nan, np.float32)
    residual = rng.standard_normal((out_chans, height, width + 5, batch)).astype(np.float32)
    call = winograd.bind(winograd.transformed_weights(weight), bias, planes, height, width, out,
                         height * row, row, threads, relu,
                         (residual.ctypes.data, height * row, row) if with_residual else None,
                         path=path)
    call()
    got = out.reshape(out_chans, height, width + 5, batch)
    want = reference(x, weight, bias, residual[:, :, :width] if with_residual else None, relu)
    scale = np.abs(want).max()
    assert np.abs(got[:, :, :width] - want).max() <= 1e-5 * max(scale, 1.0)
    assert np.isnan(got[:, :, width:]).all()  # the columns past the map are left alone


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemms_shared_among_threads_equal_numpys(threads):
    """The 36 GEMMs on threads by rows of M (37 rows: parts of 13, 13 and 11 on 3 threads),
    each a call of the BLAS numpy loaded, on slices 64 bytes past a multiple of 4 KiB apart as
    the scratch buffers are: exactly numpy's batched matmul."""
    if native.blas_sgemm() is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with 64-bit integers")
    rng = np.random.default_rng(threads)
    w = rng.standard_normal((36, 37, 20)).astype(np.float32)
    v = winograd._stack("v", 20, 48)
    v[:] = rng.standard_normal(v.shape)
    m = winograd._stack("m", 37, 48)
    native.winograd_gemms_call(w, v, m, threads)()
    np.testing.assert_allclose(m, np.matmul(w, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        native.winograd_gemms_call(w, v[:, :19], m, threads)


def test_an_unsupported_path_is_refused():
    with pytest.raises(ValueError, match="does not run"):
        native.winograd_input_call(np.zeros((1, 6, 6, 8), np.float32), 1, range(1),
                                   np.zeros((36, 1, 8), np.float32), 1, path="neon")


@pytest.mark.parametrize("density,chans,size,runs", [
    (0.3, 64, 32, True), (0.2, 64, 32, False),  # 16x16 tiles and more: from 0.28
    (0.3, 256, 8, False), (0.6, 256, 8, True),  # 8x8: from 0.5
    (0.9, 512, 4, False),                        # 4x4: never (one tile an image)
    (0.9, 3, 32, False),                         # a first layer: never
])
def test_winograd_runs_where_the_threshold_table_says(density, chans, size, runs):
    assert winograd.pays(density, chans, size, size) is runs


@pytest.mark.parametrize("density,chans,size,runs", [
    (0.2, 64, 32, True), (0.15, 64, 32, False),  # 16 tiles and more: from 0.2
    (0.2, 128, 16, True), (0.4, 16, 32, False),  # 16 channels: from 0.45
    (0.3, 256, 8, False), (0.5, 256, 8, True),   # 8x8: from 0.45
    (0.9, 512, 4, False), (0.9, 3, 32, False),   # one tile an image, a first layer: never
])
def test_single_images_have_their_own_threshold(density, chans, size, runs):
    assert winograd.pays(density, chans, size, size, single=True) is runs


def test_only_stride_one_padding_one_3x3_convs_qualify():
    weight = np.ones((8, 8, 3, 3), np.float32)
    assert SparseConv(weight, np.zeros(8, np.float32), 1, 1, True).winograd
    assert not SparseConv(weight, np.zeros(8, np.float32), 2, 1, True).winograd
    assert not SparseConv(weight, np.zeros(8, np.float32), 1, 2, True, dilation=2).winograd
    assert not SparseConv(weight[:, :4], np.zeros(8, np.float32), 1, 1, True, groups=2).winograd


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_networks_at_dnr_like_density_match_onnx_runtime(name, tmp_path):
    """At 40% density (DNR's early layers) the 3x3 layers of 16x16 outputs and more run
    Winograd on chunks of 8 images and on a single image (the 17th, a chunk of its own, with
    runs of tiles as vectors); logits stay within the parity limit of ONNX Runtime, with 1
    and 2 threads."""
    model = masked_paper_model(name, 0.4)
    export_onnx(model, torch.zeros(1, 3, 32, 32), tmp_path / "m.onnx", opset=18)
    x = np.random.default_rng(0).random((17, 3, 32, 32), dtype=np.float32)
    ort = run_logits(create_session(tmp_path / "m.onnx")[0], x)
    for threads in (1, 2):
        sparse = build_sparse_model(model, [3, 32, 32], threads=threads)
        got = sparse(x)
        assert np.abs(got - ort).max() <= PARITY_ATOL
        assert (got.argmax(1) == ort.argmax(1)).all()
    ran = [layer for layer, _ in sparse.layers if isinstance(layer, SparseConv) and
           any(layer._runs_winograd(job["geometry"]) for job in layer._jobs.values())]
    assert len(ran) >= 3  # the stride-1 layers of 64 channels or more at 32x32 and 16x16
    assert sparse.winograd_layers() == len(ran)  # what dnr-bench reports
    assert sparse.winograd_layers(batch=1) == len(ran)  # at 40%, single images alike
    line = _runtime_line({"runtime": {"name": Runtime.SPARSE.value, "kernel": "avx",
                                      "layers": len(sparse.layers), "winograd_layers": len(ran),
                                      "winograd_layers_single": len(ran),
                                      "parity": {"max_abs": 0.0}}})
    assert f"Winograd on {len(ran)} of {len(sparse.layers)} layers from 4 images and " \
        f"{len(ran)} on single images" in line
    single = [layer for layer in ran if any(job["geometry"].batch == 1 and
                                            layer._runs_winograd(job["geometry"])
                                            for job in layer._jobs.values())]
    assert single == ran
