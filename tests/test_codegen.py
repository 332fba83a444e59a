"""Generated code per layer (codegen.py, _codegen.cpp): the instructions it emits, its pages,
its bounds, and its outputs against torch and the ahead-of-time kernel on every layer shape
the engine gives it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.runtime.bench import _runtime_line
from dnr_deploy.runtime.runtimes import sparse_info
from dnr_deploy.runtime.sparse import build_from_onnx, codegen, load_sparse
from dnr_deploy.runtime.sparse.plan import SparseConv, csr_arrays
from tests.factories import write_fake_run
from tests.test_sparse_onnx_ops import CHANS, SIZE, Graph, assert_matches_ort

pytestmark = pytest.mark.skipif(not codegen.available(),
                                reason="generated code runs on x86-64 with AVX-512 only")

# What the emitter may write: anything else in a disassembly is a bug in its encoder.
MNEMONICS = {"push", "pop", "mov", "movslq", "lea", "vpxord", "vbroadcastss", "vmovups",
             "vfmadd231ps", "vaddps", "vmaxps", "test", "je", "add", "dec", "jne",
             "vzeroupper", "ret", "int3", "prefetcht1"}


def reference(x, weight, bias, stride, pad, dilation, groups, residual, relu):
    """The conv in float64 with torch, CHWN in and out."""
    nchw = torch.from_numpy(x.transpose(3, 0, 1, 2).astype(np.float64))
    y = F.conv2d(nchw, torch.from_numpy(weight.astype(np.float64)),
                 torch.from_numpy(bias.astype(np.float64)), stride, pad, dilation,
                 groups).numpy().transpose(1, 2, 3, 0)
    if residual is not None:
        y = y + residual
    return np.maximum(y, 0.0) if relu else y


def sparse_weight(rng, shape, density):
    weight = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < density)
    weight[1] = 0.0  # an output channel without a nonzero: its bias alone
    return weight


# (in, out channels, kernel, stride, pad, dilation, groups, side, images): channels past one
# block of 24 and a short last block, stride 2 on an odd map, a 1x1 stride-2 shortcut,
# dilation, groups, a first layer of 3 channels, 16 images a chunk; strided convs on 16 or 32
# images read their input in place (odd map, 5x5, depthwise), on 8 from polyphase planes
CASES = [(16, 50, 3, 1, 1, 1, 1, 8, 8), (8, 30, 3, 2, 1, 1, 1, 11, 8),
         (16, 32, 1, 2, 0, 1, 1, 8, 16), (12, 24, 3, 1, 2, 2, 1, 8, 8),
         (16, 32, 3, 1, 1, 1, 4, 8, 8), (3, 64, 3, 1, 1, 1, 1, 16, 8),
         (8, 30, 3, 2, 1, 1, 1, 11, 16), (8, 30, 5, 2, 2, 1, 1, 11, 32),
         (16, 16, 3, 2, 1, 1, 16, 8, 16)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("threads", [1, 2])
def test_generated_code_matches_torch_and_the_kernel(case, threads):
    chans, out_chans, k, stride, pad, dilation, groups, side, batch = case
    rng = np.random.default_rng(sum(case))
    weight = sparse_weight(rng, (out_chans, chans // groups, k, k), 0.3)
    bias = rng.standard_normal(out_chans).astype(np.float32)
    x = rng.standard_normal((chans, side, side, batch)).astype(np.float32)
    convs = []
    for generated in (True, False):
        conv = SparseConv(weight, bias, stride, pad, True, dilation=dilation, groups=groups)
        conv.winograd, conv.codegen = False, generated
        convs.append(conv)
    got, kernel = (conv(x, threads=threads).copy() for conv in convs)
    assert convs[0].paths() == {"generated"} and convs[1].paths() == {"kernel"}
    # in place on vectors of a pixel, where no split would copy less (a 1x1 reads 1 phase of 4)
    in_place = [job["geometry"].stride > 1 for job in convs[0]._jobs.values()]
    assert in_place == [stride > 1 and batch % 16 == 0 and k > 1]
    want = reference(x, weight, bias, stride, pad, dilation, groups, None, True)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(got - kernel).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("in_kernel", [True, False])
def test_a_residual_is_added_before_relu(in_kernel):
    """In the code's epilogue where the residual has the output's row pitch, else after the
    code (which then runs its variant without ReLU)."""
    rng = np.random.default_rng(3)
    weight = sparse_weight(rng, (40, 16, 3, 3), 0.2)
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((16, 8, 8, 8)).astype(np.float32)
    conv = SparseConv(weight, bias, 1, 1, True)
    conv.winograd = False
    conv(x)  # makes the job: its planes are 10 columns wide
    wide = rng.standard_normal((40, 8, 10 if in_kernel else 9, 8)).astype(np.float32)
    residual = wide[:, :, :8]
    got = conv(x, residual).copy()
    assert conv.paths() == {"generated"}
    assert (conv._jobs[next(iter(conv._jobs))]["residual"] is not None) == in_kernel
    want = reference(x, weight, bias, 1, 1, 1, 1, residual, True)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_the_disassembly_holds_only_the_emitters_instructions(tmp_path):
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((30, 40)) * (rng.random((30, 40)) < 0.3)
    indptr, columns, values = csr_arrays(matrix)
    code = codegen.LayerCode(indptr, columns * 16, values, np.zeros(30, np.float32), 160, True)
    (tmp_path / "code.bin").write_bytes(code.code())
    text = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64",
                           str(tmp_path / "code.bin")], capture_output=True, check=True,
                          text=True).stdout
    lines = [line.split("\t") for line in text.splitlines() if re.match(r"\s+[0-9a-f]+:\t", line)]
    mnemonics = [parts[2].split()[0] for parts in lines if len(parts) > 2]
    assert set(mnemonics) <= MNEMONICS
    # each nonzero is one multiply-add with its weight a broadcast memory operand
    assert mnemonics.count("vfmadd231ps") == np.count_nonzero(matrix)
    assert all("{1to16}" in parts[2] for parts in lines
               if len(parts) > 2 and parts[2].startswith("vfmadd231ps"))
    # and every PREFETCH multiply-adds of a segment (here a block), a line of the next one
    blocks = (np.count_nonzero(matrix[:24]), np.count_nonzero(matrix[24:]))
    assert mnemonics.count("prefetcht1") == sum(n // codegen.PREFETCH for n in blocks) > 0


def test_the_code_pages_are_executable_and_not_writable():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((24, 20)) * (rng.random((24, 20)) < 0.5)
    indptr, columns, values = csr_arrays(matrix)
    code = codegen.LayerCode(indptr, columns * 16, values, np.zeros(24, np.float32), 16, False)
    assert code.size > 0
    mapping = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
        if start <= code.address < end:
            mapping.append(line.split()[1])
    assert mapping == ["r-xp"]  # W^X: written, then made executable


def test_displacements_past_32_bits_fall_back_to_the_kernel():
    indptr, columns, values = csr_arrays(np.ones((30, 4), np.float32))
    with pytest.raises(ValueError, match="32-bit"):  # row 24 would sit 2^31 bytes away
        codegen.LayerCode(indptr, columns, values, np.zeros(30, np.float32), 2 ** 27, True)
    far = np.full(len(columns), 2 ** 29 - 1024, np.int64)  # input 2 GiB - 4 KiB away
    with pytest.raises(ValueError, match="32-bit"):
        codegen.LayerCode(indptr, far, values, np.zeros(30, np.float32), 16, True)
    with pytest.raises(ValueError, match="do not match"):  # a CSR that lies about its size
        codegen.LayerCode(np.array([0, 5]), columns[:4], values[:4], np.zeros(1, np.float32),
                          16, True)


@pytest.mark.parametrize("threads", [1, 2])
def test_segments_over_fixed_channels_compute_what_the_others_do(threads):
    """Segments cut at whole input planes (`span`; one thread runs segment k of every block
    before segment k + 1 of any) give the other cut's outputs exactly, empty segments (a
    plane no channel of a block uses) and a residual in the epilogue included."""
    rng = np.random.default_rng(7)
    plane, planes, rows = 64, 12, 50
    weight = rng.standard_normal((rows, planes, 9)).astype(np.float32)
    weight *= rng.random(weight.shape) < 0.3
    weight[:, 4:6] = 0.0  # two planes no row uses: empty segments in every block
    indptr, columns, values = csr_arrays(weight.reshape(rows, -1))
    offsets = columns // 9 * plane + columns % 9 * 16  # plane, then a tap 16 floats apart
    bias = rng.standard_normal(rows).astype(np.float32)
    src = rng.standard_normal(planes * plane + 256).astype(np.float32)
    residual = rng.standard_normal(rows * 64).astype(np.float32)
    positions = np.array([0, 16], np.int32)
    outs = []
    for span in (0, plane, 3 * plane):
        code = codegen.LayerCode(indptr, offsets, values, bias, 64, True, segment=40, span=span)
        out = np.zeros(rows * 64, np.float32)
        code.call(src, positions, out, threads, (residual.ctypes.data, 64))()
        outs.append(out)
    assert np.abs(outs[0]).max() > 0
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_too_many_fixed_segments_fall_back_to_the_kernel():
    indptr, columns, values = csr_arrays(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="32-bit"):  # offsets to 2^20 cut every float: refused
        codegen.LayerCode(indptr, columns * 2 ** 19, values, np.zeros(2, np.float32), 32, True,
                          span=1)


def test_segments_take_enough_planes_to_stay_within_the_emitters_bound(monkeypatch):
    """A layer with more input planes than MAX_SPANS segments' worth gets segments of several
    planes each, and still runs generated code (the bound lowered to 4 for a small layer)."""
    monkeypatch.setattr(codegen, "MAX_SPANS", 4)
    rng = np.random.default_rng(3)
    weight = sparse_weight(rng, (24, 200, 3, 3), 0.4)  # uncapped: 12 planes a segment
    bias = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((200, 4, 4, 16)).astype(np.float32)
    conv = SparseConv(weight, bias, 1, 1, False)
    conv.winograd = False
    got = conv(x).copy()
    g = next(iter(conv._jobs.values()))["geometry"]
    assert conv._span(g) == 50 * g.plane  # 200 planes in 4 segments
    assert conv.paths() == {"generated"}
    want = reference(x, weight, bias, 1, 1, 1, 1, None, False)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_a_call_past_its_buffers_is_refused():
    indptr, columns, values = csr_arrays(np.ones((2, 3), np.float32))
    code = codegen.LayerCode(indptr, columns * 16, values, np.zeros(2, np.float32), 32, True)
    src, out = np.zeros(64, np.float32), np.zeros(64, np.float32)
    code.call(src, np.array([0], np.int32), out, 1)()
    with pytest.raises(ValueError, match="past its buffers"):
        code.call(src, np.array([32], np.int32), out, 1)


def test_a_deploy_dir_runs_the_same_with_and_without_generated_code(tmp_path):
    run_dir = tmp_path / "run"
    run = write_fake_run(run_dir, "irregular", density=0.2)
    export_run(ExportConfig(run_dir=str(run_dir)))
    images = np.random.default_rng(0).random((16, *run["input_shape"])).astype(np.float32)
    logits = []
    for generated in (True, False):
        model = load_sparse(run_dir / "deploy")
        for layer, _ in model.layers:
            if isinstance(layer, SparseConv):
                layer.codegen = layer.codegen and generated
        logits.append(model(images))
        paths = set().union(*(layer.paths() for layer, _ in model.layers
                              if isinstance(layer, SparseConv)))
        assert ("generated" in paths) == generated
    assert np.array_equal(logits[0].argmax(1), logits[1].argmax(1))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-4
    info = sparse_info(model, 1)  # what dnr-bench records and prints
    assert info["generated_code_layers"] == 0  # the last model had it switched off
    line = _runtime_line({"runtime": {**info, "generated_code_layers": 3,
                                      "parity": {"max_abs": 0.0}}})
    assert f"generated code on 3 of {info['layers']} layers" in line


def test_where_winograd_also_pays_the_faster_one_runs():
    """A layer both pay on (3x3, 32 channels, 16x16, density 0.5): one of them is kept for the
    shape, and its output is the conv's."""
    rng = np.random.default_rng(5)
    weight = sparse_weight(rng, (32, 32, 3, 3), 0.5)
    bias = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((32, 16, 16, 8)).astype(np.float32)
    conv = SparseConv(weight, bias, 1, 1, True)
    assert conv.codegen and conv.runs_winograd_at(16, 16, batch=8)
    got = conv(x).copy()
    assert len(conv.paths()) == 1 and conv.paths() <= {"winograd", "generated"}
    want = reference(x, weight, bias, 1, 1, 1, 1, None, True)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def downsampling_block() -> Graph:
    """A ResNet downsampling block: a conv, then a 3x3 stride-2 conv and a 1x1 stride-2
    projection both reading its output, added."""
    g = Graph(seed=4)
    first = g.op("Relu", [g.conv("input", CHANS, CHANS, pads=[1] * 4)])[0]
    main = g.op("Relu", [g.conv(first, 2 * CHANS, CHANS, pads=[1] * 4, strides=[2, 2])])[0]
    main = g.conv(main, 2 * CHANS, 2 * CHANS, pads=[1] * 4)
    shortcut = g.conv(first, 2 * CHANS, CHANS, kernel=1, density=0.6, strides=[2, 2])
    return g.model(g.op("Relu", [g.op("Add", [main, shortcut])[0]])[0], chans=CHANS)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_strided_conv_reads_the_planes_the_conv_before_wrote(threads):
    """On chunks of 16 images the 3x3 stride-2 conv reads its padded input in place, which
    the conv before writes straight into, and the projection, its second reader, reads the
    same planes (nothing split or copied). The logits are ONNX Runtime's at batch 16 and 32."""
    model = downsampling_block()
    for batch in (16, 32):
        assert_matches_ort(model, batch=batch)
    engine = build_from_onnx(model, [CHANS, SIZE, SIZE], threads=threads)
    x = np.random.default_rng(5).random((32, CHANS, SIZE, SIZE), dtype=np.float32)
    want = build_from_onnx(model, [CHANS, SIZE, SIZE], threads=1)(x[:16])
    for _ in range(4):  # through the thread-split trial and past it
        np.testing.assert_allclose(engine(x)[:16], want, rtol=1e-5, atol=1e-5)
    convs = [step for _, step, _ in engine.steps if isinstance(step, SparseConv)]
    strided = [conv for conv in convs if conv.stride == 2]
    assert convs[0].into is strided[0] and strided[0].shape[2] == 3
    assert strided[1].shares is strided[0]
    jobs = [next(job for key, job in conv._jobs.items() if key[0][3] == 16)
            for conv in (convs[0], *strided)]
    assert all(job["geometry"].stride == 2 and job["path"] == "generated" for job in jobs[1:])
    assert jobs[0]["view"] is jobs[1]["interior"]  # written there: nothing to split or copy
    assert jobs[2]["src"] is jobs[1]["src"]  # the projection reads the same planes
    assert jobs[2]["geometry"].origin == (jobs[1]["geometry"].wq + 1) * 16  # at pad 0 in pad 1
