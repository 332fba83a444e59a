"""`--runtime auto` (the default of dnr-bench and dnr-verify): the sparse engine for an
irregular float deploy dir on the CPU, ONNX Runtime for channel, dense and int8 ones, and
ONNX Runtime with the reason recorded when the engine has no step for an op."""

from __future__ import annotations

import pytest

from dnr_deploy.runtime import bench as bench_module
from dnr_deploy.runtime.bench import BenchConfig, bench
from dnr_deploy.runtime.runtimes import (
    Runtime,
    SparseUnsupportedError,
    choose_runtime,
)
from dnr_deploy.runtime.sparse import UnsupportedLayerError
from tests.factories import write_fake_run


def _deploy(tmp_path_factory, granularity: str):
    from dnr_deploy.export import ExportConfig, export_run

    run_dir = tmp_path_factory.mktemp(granularity) / "run"
    write_fake_run(run_dir, granularity)
    export_run(ExportConfig(run_dir=str(run_dir)))
    return run_dir / "deploy"


@pytest.fixture(scope="module")
def irregular(tmp_path_factory):
    return _deploy(tmp_path_factory, "irregular")


@pytest.mark.parametrize("files,provider,want", [
    ({"model.onnx": {}, "weights.csr.npz": {}}, "cpu", Runtime.SPARSE),
    ({"model.onnx": {}, "weights.csr.npz": {}}, "cuda", Runtime.ORT),
    ({"model.onnx": {}, "weights.npz": {}}, "cpu", Runtime.ORT),
    ({"model.onnx": {}, "weights.csr.npz": {}, "model.fp32.onnx": {}}, "cpu", Runtime.ORT),
])
def test_auto_picks_by_deploy_dir(files, provider, want):
    chosen, why = choose_runtime("auto", {"files": files, "granularity": "x"}, provider)
    assert chosen is want and why.startswith("auto")
    assert choose_runtime("ort", {"files": files}, "cpu")[0] is Runtime.ORT


def test_bench_runs_the_sparse_engine_by_default(irregular, tmp_path):
    report = bench(BenchConfig(deploy_dir=str(irregular), batch="1,3", runs=3, warmup=1,
                               out=str(tmp_path))).report
    assert report["runtime"]["name"] == "sparse"
    assert report["runtime"]["chosen_by"] == "auto: an irregular deploy dir"
    assert report["runtime"]["parity"]["same_argmax"]


def test_bench_on_a_channel_deploy_dir_runs_onnx_runtime(tmp_path_factory, tmp_path):
    channel = _deploy(tmp_path_factory, "channel")
    report = bench(BenchConfig(deploy_dir=str(channel), batch="1", runs=2, warmup=0,
                               out=str(tmp_path))).report
    assert report["runtime"] == {"name": "ort", "chosen_by": "auto: a channel deploy dir"}


def test_auto_falls_back_when_an_op_has_no_step(irregular, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise SparseUnsupportedError(f"--runtime sparse: {UnsupportedLayerError('no Foo')}")

    monkeypatch.setattr(bench_module, "open_sparse", refuse)
    report = bench(BenchConfig(deploy_dir=str(irregular), batch="1", runs=2, warmup=0,
                               out=str(tmp_path))).report
    assert report["runtime"]["name"] == "ort" and "no Foo" in report["runtime"]["fallback"]
    with pytest.raises(bench_module.BenchError, match="no Foo"):
        bench(BenchConfig(deploy_dir=str(irregular), batch="1", runs=2, warmup=0,
                          runtime="sparse", out=str(tmp_path)))
