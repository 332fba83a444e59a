"""The kernel's segments of input channels (`SparseConv._segments`, _kernels.cpp's
conv_segments): the same outputs as whole channels and as torch, with residuals, ReLU, empty
segments, strided inputs, tiles whose vectors lie side by side or apart, and threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnr_deploy.runtime.sparse import native, plan
from dnr_deploy.runtime.sparse.plan import SparseConv

pytestmark = pytest.mark.skipif(not native.available, reason="the C++ kernel is not built")

# (in, out channels, kernel, stride, pad, density, images, side): chunks of 1 (a stretch with
# garbage columns: tiles of side-by-side vectors), 4 and 8 on 4x4 maps (a tile spans rows: its
# vectors apart), 16 on 8x8, a strided conv on polyphase planes, a 1x1 conv, a denser layer
CASES = [(64, 40, 3, 1, 1, 0.1, 1, 9), (64, 40, 3, 1, 1, 0.1, 4, 4),
         (96, 24, 3, 1, 1, 0.05, 8, 4), (64, 30, 3, 1, 1, 0.1, 16, 8),
         (64, 32, 3, 2, 1, 0.1, 8, 9), (128, 16, 1, 1, 0, 0.2, 8, 4),
         (32, 32, 3, 1, 1, 0.4, 8, 8)]


def reference(x, weight, bias, stride, pad, residual, relu):
    nchw = torch.from_numpy(x.transpose(3, 0, 1, 2).astype(np.float64))
    y = F.conv2d(nchw, torch.from_numpy(weight.astype(np.float64)),
                 torch.from_numpy(bias.astype(np.float64)), stride, pad).numpy()
    y = y.transpose(1, 2, 3, 0) + residual
    return np.maximum(y, 0.0) if relu else y


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_segments_compute_what_whole_channels_do(case, threads, monkeypatch):
    """Segments of a few nonzeros (many segments, some empty for some rows) against whole
    channels and torch, the residual added and ReLU applied after the last segment only."""
    monkeypatch.setattr(plan, "SEGMENT_NONZEROS", 4)
    chans, out_chans, k, stride, pad, density, batch, side = case
    rng = np.random.default_rng(int(sum(case) * 10) + threads)
    weight = rng.standard_normal((out_chans, chans, k, k)).astype(np.float32)
    weight *= rng.random(weight.shape) < density
    weight[:, : chans // 4] = 0.0  # the first quarter of the channels: empty segments
    weight[2] = 0.0  # a row with no nonzero: its bias (and residual) alone
    bias = rng.standard_normal(out_chans).astype(np.float32)
    x = rng.standard_normal((chans, side, side, batch)).astype(np.float32)
    outputs = []
    for segmented in (True, False):
        conv = SparseConv(weight, bias, stride, pad, True)
        conv.winograd, conv.codegen, conv.segmented = False, False, segmented
        conv(x, threads=threads)  # the job, then a residual laid out as its output
        job = next(iter(conv._jobs.values()))
        g = job["geometry"]
        wide = np.random.default_rng(1).standard_normal(
            (out_chans, g.ho, g.out_width, batch)).astype(np.float32)
        residual = wide[:, :, :g.wo]
        outputs.append(conv(x, residual, threads=threads).copy())
        assert job["residual"] is not None  # added in the kernel's epilogue
        segments = conv._segments(g, conv.offsets(g).astype(np.int32))
        assert (segments is not None and segments.count >= 4) == segmented
    want = reference(x, weight, bias, stride, pad, residual, True)
    scale = max(1.0, np.abs(want).max())
    assert np.abs(outputs[0] - want).max() <= 1e-5 * scale
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-5 * scale


def test_segments_hold_about_the_set_number_of_nonzeros_a_row():
    """A power of 2 channels a segment, so that each row has about SEGMENT_NONZEROS nonzeros in
    it; none where one segment would hold every channel."""
    rng = np.random.default_rng(0)
    for chans, density, want in ((512, 0.05, 8), (256, 0.15, 16), (512, 0.02, 4), (64, 0.05, 0)):
        weight = (rng.random((32, chans, 3, 3)) < density).astype(np.float32)
        conv = SparseConv(weight, np.zeros(32, np.float32), 1, 1, True)
        conv.winograd, conv.codegen = False, False
        conv(np.zeros((chans, 4, 4, 8), np.float32))
        g = next(iter(conv._jobs.values()))["geometry"]
        segments = conv._segments(g, conv.offsets(g).astype(np.int32))
        assert (segments.count if segments else 0) == want
        if segments:
            per_row = np.diff(segments.indptr).reshape(segments.count, 32).mean()
            assert plan.SEGMENT_NONZEROS / 2 <= per_row <= plan.SEGMENT_NONZEROS * 2


def test_segments_that_do_not_match_the_layer_are_refused():
    conv = SparseConv(np.ones((4, 64, 3, 3), np.float32), np.zeros(4, np.float32), 1, 1, True)
    g = conv.geometry((64, 4, 4, 8))
    offsets = conv.offsets(g).astype(np.int32)
    good = conv._segments(g, offsets)
    bad = native.Segments(good.indptr[:-1], good.offsets, good.values, good.count, 8)
    src, out = np.zeros(64 * g.plane + 1024, np.float32), np.zeros(4 * g.length, np.float32)
    with pytest.raises(ValueError, match="segments do not match"):
        native.conv_call(src, offsets, conv.indptr, conv.values, conv.bias,
                         np.array([0], np.int32), 8, 1, 1, out, g.length, True, segments=bad)
