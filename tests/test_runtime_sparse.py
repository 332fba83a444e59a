"""The sparse runtime: kernels against torch's conv2d, parity with ONNX Runtime on irregular
exports (the fake run, VGG16 and ResNet-18 at 5% density), dnr-bench and dnr-verify with
--runtime sparse, and the refusals (channel deploy dirs, ops without a sparse step)."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnr_deploy.cli import bench_main, verify_main
from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.export.onnx import export_onnx
from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import time_sessions
from dnr_deploy.runtime.runtimes import PARITY_ATOL
from dnr_deploy.runtime.session import create_session, run_logits
from dnr_deploy.runtime.sparse import (
    DENSE_THRESHOLD,
    UnsupportedLayerError,
    build_sparse_model,
    codegen,
    load_sparse,
    native,
)
from dnr_deploy.runtime.sparse.executor import fold_batch_norm
from dnr_deploy.runtime.sparse.plan import SparseConv
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks
from tests.factories import masked_paper_model, randomize_norms, write_fake_run
from tests.helpers import assert_clean_failure


@pytest.fixture(scope="module")
def irregular_deploy(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sparse") / "run"
    write_fake_run(run_dir, "irregular")
    export_run(ExportConfig(run_dir=str(run_dir), baseline=True))
    return run_dir / "deploy"


def call(main, args: list[str], capsys) -> subprocess.CompletedProcess:
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def chw_n(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().transpose(1, 2, 3, 0))


@pytest.mark.parametrize("native_kernel", [True, False], ids=["cpp", "numba"])
@pytest.mark.parametrize("kernel,stride,padding,density,batch,size", [
    (3, 1, 1, 0.1, 1, 8), (3, 2, 1, 0.1, 3, 9), (1, 2, 0, 0.2, 2, 8), (3, 1, 0, 0.05, 5, 6),
    (3, 1, 1, 0.1, 8, 8), (3, 2, 1, 0.1, 8, 8),  # 8 images: AVX-512's 16-float vectors
    (3, 2, 1, 0.1, 1, 9), (1, 2, 0, 0.2, 1, 8),  # single images: the split's row copy
    (3, 1, 1, 0.95, 2, 5),  # dense fallback (above DENSE_THRESHOLD)
])
def test_conv_kernel_matches_torch(kernel, stride, padding, density, batch, size,
                                   native_kernel, monkeypatch):
    if native_kernel and not native.available:
        pytest.skip("the C++ kernel is not built (python setup.py build_ext --inplace)")
    monkeypatch.setattr(native, "available", native_kernel)
    g = torch.Generator().manual_seed(0)
    # the dense fallback wants a layer of DENSE_MIN_WEIGHTS; the sparse cases stay small
    out_chans, in_chans = (16, 32) if density > DENSE_THRESHOLD else (6, 5)
    weight = torch.randn(out_chans, in_chans, kernel, kernel, generator=g)
    weight *= torch.rand(weight.shape, generator=g) < density
    bias = torch.randn(out_chans, generator=g)
    x = torch.randn(batch, in_chans, size, size, generator=g)
    for relu in (False, True):
        conv = SparseConv(weight.numpy(), bias.numpy(), stride, padding, relu)
        got = conv(chw_n(x)).transpose(3, 0, 1, 2)
        want = F.conv2d(x, weight, bias, stride, padding)
        want = want.clamp(min=0) if relu else want
        # the dense fallback's BLAS sums 288 terms per output in its own order: float32
        # rounding of a few 1e-5 at outputs of size 20; the sparse cases sum a handful
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4 if conv.dense else 1e-5)
        assert conv.dense == (density > DENSE_THRESHOLD)
    small = SparseConv(np.ones((2, 1, 3, 3), np.float32), np.zeros(2, np.float32), 1, 1, False)
    assert not small.dense  # a tiny dense layer runs in the sparse kernel, below the minimum


@pytest.mark.parametrize("batch", [1, 3, 4, 8])  # 1: single-image paths; 4, 8: vector paths
def test_pool_kernels_match_numpy_on_views_with_garbage_columns(batch):
    if not native.available:
        pytest.skip("the C++ kernel is not built (python setup.py build_ext --inplace)")
    rng = np.random.default_rng(batch)
    # a layer's output as the pools get it: rows of 7 columns of which 6 are pixels
    x = rng.standard_normal((5, 6, 7, batch), dtype=np.float32)[:, :, :6]
    want_max = x.reshape(5, 3, 2, 3, 2, batch).max(axis=(2, 4))
    got_max = np.full((5, 3, 3, batch), np.nan, np.float32)
    native.max_pool_call(x, 2, got_max)()
    np.testing.assert_array_equal(got_max, want_max)
    got_mean = np.full((5, batch), np.nan, np.float32)
    native.global_avg_pool_call(x, got_mean)()
    np.testing.assert_allclose(got_mean, x.mean(axis=(1, 2)), atol=1e-6)


def test_batch_norm_folding_keeps_zeros():
    norm = nn.BatchNorm2d(4).eval()
    randomize_norms(nn.Sequential(norm), torch.Generator().manual_seed(1))
    weight = torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.3)
    folded, bias = fold_batch_norm(weight, None, norm)
    assert ((folded == 0) == (weight.numpy() == 0)).all()
    x = torch.randn(2, 3, 6, 6)
    np.testing.assert_allclose(F.conv2d(x, torch.from_numpy(folded), torch.from_numpy(bias),
                                        padding=1).numpy(),
                               norm(F.conv2d(x, weight, padding=1)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("native_kernel", [True, False], ids=["cpp", "numba"])
def test_fake_run_matches_onnx_runtime(irregular_deploy, native_kernel, monkeypatch):
    """The whole default net, in the C++ kernels or (as without a compiler) in numba's."""
    if native_kernel and not native.available:
        pytest.skip("the C++ kernel is not built (python setup.py build_ext --inplace)")
    monkeypatch.setattr(native, "available", native_kernel)
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    session, _ = create_session(irregular_deploy / "model.onnx")
    ort = run_logits(session, x)
    assert load_sparse(irregular_deploy)(x[:0]).shape == (0, ort.shape[1])
    for threads in (1, 2):
        sparse = load_sparse(irregular_deploy, threads=threads)(x)
        assert np.abs(sparse - ort).max() <= PARITY_ATOL
        assert (sparse.argmax(1) == ort.argmax(1)).all()


@pytest.mark.parametrize("wide", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_paper_architectures_at_5_percent_match_onnx_runtime(name, wide, tmp_path, monkeypatch):
    if wide and not native.wide_vectors():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(native, "wide_vectors", lambda: wide)
    model = masked_paper_model(name, 0.05)
    export_onnx(model, torch.zeros(1, 3, 32, 32), tmp_path / "m.onnx", opset=18)
    # 9 images: a chunk of 8 (16-float vectors with AVX-512) or two of 4, then a single one
    x = np.random.default_rng(0).random((9, 3, 32, 32), dtype=np.float32)
    ort = run_logits(create_session(tmp_path / "m.onnx")[0], x)
    sparse = build_sparse_model(model, [3, 32, 32])
    got = sparse(x)
    assert np.abs(got - ort).max() <= PARITY_ATOL
    assert (got.argmax(1) == ort.argmax(1)).all()
    macs = sparse.macs([3, 32, 32])
    assert 0.04 < macs["nonzero"] / macs["dense"] < 0.06
    assert not any(layer.dense for layer, _ in sparse.layers)


def test_thread_split_is_tried_again_once_the_machine_has_settled(irregular_deploy):
    """The first trial can run beside another runtime's spinning workers; the RETRIAL-th batch
    of the same size decides again, on all candidates."""
    engine = load_sparse(irregular_deploy, threads=2)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    tried = []
    run = engine._run
    engine._run = lambda chunks, split: tried.append(split) or run(chunks, split)
    engine(x)
    first = list(tried)
    trials = len(first) // 2 - 1  # each candidate: one untimed call, then the timed ones
    assert set(first) == {"layers", "none"} and len(first) == 2 * (trials + 1) + 1
    assert engine.TRIALS <= trials <= engine.MAX_TRIALS
    for call in range(2, engine.RETRIAL + 1):
        tried.clear()
        engine(x)
        if call == engine.RETRIAL:  # a whole trial again, on every candidate
            assert set(tried) == {"layers", "none"} and len(tried) >= 2 * (engine.TRIALS + 1) + 1
        else:
            assert len(tried) == 1


def test_a_split_over_threads_slower_than_one_thread_falls_back(irregular_deploy):
    """Calls that do not bear the trial out (a busy second core) send the batch size back
    to one thread after WATCH of them; calls on one thread are not watched."""
    engine = load_sparse(irregular_deploy, threads=2)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    engine(x)
    key = next(iter(engine._splits))
    engine._splits[key] = "layers"
    engine._calls[key] = engine.RETRIAL  # no second trial in this test
    engine._recent.pop(key, None)  # the first call's, if its trial split over threads
    run = engine._run

    def slow_when_split(chunks, split):
        if split != "none":
            time.sleep(engine._one_thread_best[key] * 2)
        return run(chunks, split)

    engine._run = slow_when_split
    for _ in range(engine.WATCH):
        assert engine._splits[key] == "layers"
        engine(x)
    assert engine._splits[key] == "none"
    engine(x)
    assert engine._recent.get(key, []) == []


# 101 ms: 1% behind the layers split, so a sleep overshooting by 4 ms does not flip it (at 20
# ms, with 0.8 ms to spare, a loaded machine flipped it twice)
@pytest.mark.parametrize("images_ms,want", [(101.0, "images"), (120.0, "layers")])
def test_chunks_per_thread_are_kept_unless_the_layers_split_clearly_wins(irregular_deploy,
                                                                         images_ms, want):
    """A trial whose layers split beats chunks per thread by less than 5% keeps the chunks;
    by more, the layers split (times faked: one thread 200 ms, layers 100). The trial's calls
    only sleep: real ones, OpenMP in the layers of several chunks, took tens of ms more than
    chunks per thread on a loaded machine and flipped the outcome."""
    engine = load_sparse(irregular_deploy, threads=2)
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)  # 2 chunks or more
    run = engine._run
    delay = {"none": 0.200, "layers": 0.100, "images": images_ms / 1e3}
    logits = run(x, "none")

    def timed(chunks, split):
        time.sleep(delay[split])
        return logits

    engine._run = timed
    engine(x)
    assert engine.split_of(32) == want


def test_a_batch_size_under_the_split_threshold_stays_on_one_thread(irregular_deploy):
    """Calls whose one-thread trial took under MIN_SPLIT_SECONDS are not split over threads,
    whatever the trial measured for the splits."""
    engine = load_sparse(irregular_deploy, threads=2)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    engine(x)
    key = engine._batch_key(16)
    assert engine._one_thread_best[key] < engine.MIN_SPLIT_SECONDS  # the fake net: ~0.1 ms
    assert engine._splits[key] == "none"


def test_a_batch_size_settled_on_one_thread_skips_the_thread_split(irregular_deploy):
    """Once the trial and its retrial chose one thread for a one-chunk batch, calls go
    straight through, as on a 1-thread engine; before that they still count toward the
    retrial."""
    engine = load_sparse(irregular_deploy, threads=2)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    want = engine(x)
    key = engine._batch_key(1)
    engine._splits[key] = "none"
    ran = []
    run = engine._run
    engine._run = lambda chunks, split: ran.append(split) or run(chunks, split)
    engine._calls[key] = engine.RETRIAL - 2
    engine(x)
    assert ran == ["none"] and engine._calls[key] == engine.RETRIAL - 1
    engine._calls[key] = engine.RETRIAL + 1
    np.testing.assert_array_equal(engine(x), want)
    assert ran == ["none"]  # no second call through the split


def test_step_times_cover_every_step_and_leave_the_plan_as_it_was(irregular_deploy):
    """The per-layer profile times each step of the plan once per call, counts the conv
    layers' MACs for the whole batch, and puts the untimed plan back."""
    engine = load_sparse(irregular_deploy, threads=1)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    before = engine(x)
    plan = list(engine._plan)
    rows = engine.step_times(x, rounds=3)
    assert [row["step"] for row in rows] == [str(node) for node, *_ in plan]
    assert engine._plan == plan
    assert all(row["ms"] > 0 for row in rows)
    convs = [row for row in rows if row["kind"] == "SparseConv"]
    assert convs and sum(row["nonzero_macs"] for row in convs) <= \
        engine.macs([1, 8, 8])["nonzero"] * len(x)
    assert all(0 < row["nonzero_macs"] < row["dense_macs"] for row in convs)
    np.testing.assert_array_equal(engine(x), before)


def test_resnet_plan_fuses_additions_and_writes_into_the_next_planes():
    """The plan the batch-16 speed rests on: every residual addition and its ReLU run in a
    conv's epilogue, stride-1 convs read planes the layer before wrote into (no copy), so do
    stride-2 convs whose generated code reads them in place (chunks of 16 images), and each
    projection shortcut is laid out like the conv that adds it."""
    model = create_model("resnet18", 10, 3, [0.5] * 3, [0.25] * 3).eval()
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    apply_masks(model, random_masks(weights, 0.05, torch.Generator().manual_seed(0)))
    sparse = build_sparse_model(model, [3, 32, 32])
    convs = [step for _, step, _ in sparse.steps if isinstance(step, SparseConv)]
    assert len(convs) == len(sparse.layers) - 1 == 20  # 17 3x3, 3 shortcuts; the classifier
    assert len(sparse.steps) == len(convs) + 3  # + pool, flatten, fc, and nothing else
    with_residual = [inputs for _, step, inputs in sparse.steps
                     if isinstance(step, SparseConv) and len(inputs) == 2]
    assert len(with_residual) == 8  # every block's conv2
    # the stem and every conv1 into the next conv; a block's conv2 into the next block's
    # conv1 where that has stride 1 (4 of 7), or stride 2 and code that may read in place
    strided = sum(conv.into is not None and conv.into.stride == 2 for conv in convs)
    assert strided == (3 if codegen.available() else 0)
    assert sum(conv.into is not None for conv in convs) == 1 + 8 + 4 + strided
    assert sum(conv.match is not None for conv in convs) == 3
    big = sparse.chunk  # 16 images with generated code, else 8
    for batch in (4, 16):  # one chunk of 4 images, chunks of `big`
        sparse(np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32))
    written = {4: 0, big: 0}
    for conv in (c for c in convs if c.into is not None):
        for key, job in conv._jobs.items():
            chunk = key[0][3]
            consumer = next(j for k, j in conv.into._jobs.items() if k[0][3] == chunk)
            if consumer["interior"] is not None:  # stride 1, or read in place (not 4 images)
                assert job["view"] is consumer["interior"]  # written there: no copy
                written[chunk] += 1
    assert written == {4: 1 + 8 + 4, big: 1 + 8 + 4 + strided}
    bound = [job for conv in convs for key, job in conv._jobs.items()
             if job["residual"] and key[0][3] == 4]
    assert len(bound) == 8  # the kernel adds each residual itself (same layout)


def test_residual_of_another_layout_is_added_after_the_kernel():
    """conv(x) + x on the model's input: x has no padded pitch, so the addition falls back
    to numpy after the kernel; the result must not change."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x) + x)

    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.conv.weight *= torch.rand_like(model.conv.weight) < 0.2
    sparse = build_sparse_model(model, [8, 6, 6])
    assert len(sparse.steps) == 1  # conv, add and relu in one step
    x = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    # a model without a classifier comes back as its CHWN output flattened per channel
    np.testing.assert_allclose(sparse(x), want.transpose(1, 2, 3, 0).reshape(8, -1).T,
                               atol=1e-5)
    (job,) = sparse.steps[0][1]._jobs.values()
    assert job["residual"] is None  # not bound: the numpy addition ran


def test_normalization_is_folded_into_the_first_conv(irregular_deploy):
    """The digits net's Normalize becomes the first conv's weights, bias and padding value
    (its mean): no step of its own, same logits (test_fake_run_matches_onnx_runtime)."""
    sparse = load_sparse(irregular_deploy)
    first = sparse.steps[0][1]
    assert isinstance(first, SparseConv) and first.border is not None
    assert sparse.steps[0][2] == [None]  # it reads the images themselves


def test_time_sessions_takes_turns_and_times_exactly_runs_calls():
    calls: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, names, feed):
            calls.append(self.name)

    timed = time_sessions({"a": Fake("a"), "b": Fake("b")}, np.zeros((2, 1)), 1, 7, turn=3)
    assert all(len(stats) and timed[k]["p50_ms"] >= 0 for k, stats in timed.items())
    # warm-up, then turns of 1 untimed + 3 timed calls (the last turn 1 timed), order flipping
    assert calls == ["a", "b"] + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a", "a"] + \
        ["b", "b"]
    plain: list[str] = []
    calls = plain
    time_sessions({"a": Fake("a"), "b": Fake("b")}, np.zeros((2, 1)), 0, 3)
    assert plain == ["a", "b", "b", "a", "a", "b"]


def test_unsupported_op_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid())
    with pytest.raises(ValueError, match="eval"):
        build_sparse_model(model, [1, 8, 8])
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        build_sparse_model(model.eval(), [1, 8, 8])


def test_bench_runtime_sparse_round_trip(irregular_deploy, tmp_path, capsys):
    out = tmp_path / "reports"
    result = call(bench_main, [str(irregular_deploy), "--runtime", "sparse", "--runs", "3",
                               "--warmup", "1", "--batch", "1,4", "--out", str(out), "--json"],
                  capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["runtime"] == "sparse"
    runtime = report["runtime"]
    assert runtime["name"] == "sparse" and runtime["threads"] == 1
    assert runtime["parity"]["max_abs"] <= PARITY_ATOL and runtime["parity"]["same_argmax"]
    assert runtime["kernel"] in ("cpp-avx512", "cpp-avx2", "cpp", "numba")
    assert set(report["models"]["model"]["latency"]) == {"1", "4"}
    assert report["comparison"]["sparse_kernel_mac_ratio"] > 1
    plain = call(bench_main, [str(irregular_deploy), "--runtime", "ort", "--runs", "2",
                              "--warmup", "0", "--out", str(tmp_path / "ort"), "--json"], capsys)
    assert json.loads(plain.stdout)["runtime"] == {"name": "ort", "chosen_by": "--runtime ort"}


def test_verify_runtime_sparse_scores_with_it(irregular_deploy, tmp_path, capsys):
    out = tmp_path / "reports"
    result = call(verify_main, [str(irregular_deploy), "--runtime", "sparse", "--n", "16",
                                "--steps", "2", "--queries", "10", "--targets", "2", "--no-gate",
                                "--out", str(out), "--json"], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "verify.json").read_text())
    assert report["runtime"]["name"] == "sparse"
    assert report["attack"]["scored_by"] == "dnr_deploy.runtime.sparse"
    assert report["runtime"]["parity"]["max_abs"] <= PARITY_ATOL


@pytest.mark.parametrize("main", [bench_main, verify_main], ids=["bench", "verify"])
def test_runtime_sparse_refuses_a_channel_deploy_dir(main, tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, "channel")
    export_run(ExportConfig(run_dir=str(run_dir)))
    result = call(main, [str(run_dir / "deploy"), "--runtime", "sparse"], capsys)
    assert_clean_failure(result)
    assert "irregular" in result.stderr and "--runtime ort" in result.stderr
