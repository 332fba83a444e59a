"""Unbounded resources and graphs the manifest does not describe (issue 25, findings 4, 5, 7):
absurd thread counts, batches and input shapes, a small model.onnx whose sparse initializer
claims huge dims, external data inside a function body, unknown operators, a re-hashed model
of another network, an efficiency above its physical limit, and a weight edit that kills clean
accuracy. Each is refused before anything big is allocated: exit 2 (the gate: exit 1), one line.

The deploy dirs are built as dnr-export writes them (sparse initializers by export's own
`sparsify_initializers`; one slow test uses a real export), copied and then edited into hostile
but self-consistent ones (`rehash`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dnr_deploy import resources
from dnr_deploy.cli import bench_main, verify_main
from dnr_deploy.deploydir.manifest import MANIFEST_NAME, write_manifest
from dnr_deploy.deploydir.opening import open_deploy_dir
from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.runtime import bench, verdict
from tests.factories import make_deploy_dir, onnx_sizes, tiny_graph, write_fake_run
from tests.helpers import cli_env
from tests.reliability_support import assert_clean_error, call_main, rehash

FAST_BENCH = ["--runs", "2", "--warmup", "0"]
FAST_VERIFY = ["--n", "8", "--steps", "1", "--queries", "10"]
PEAK_LIMIT_MB = 600  # a refused request stays near the interpreter's own size (about 60-200)


def sparse_deploy_dir(folder: Path) -> Path:
    """`make_deploy_dir`'s network pruned to about 13% and written with sparse initializers by
    export's own `sparsify_initializers`, with a manifest to match (as dnr-export writes one)."""
    deploy = make_deploy_dir(folder)
    path = deploy / "model.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in ("w", "fc"):
            array = numpy_helper.to_array(init).copy()
            array[np.abs(array) < 1.5] = 0.0
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))
    assert onnx_io.sparsify_initializers(path, {"w", "fc"})["sparse"] == 2
    info = json.loads((deploy / MANIFEST_NAME).read_text())
    del info["files"]
    write_manifest(deploy, {**info, "onnx_sizes": onnx_sizes(deploy)})
    return deploy


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A deploy dir with sparse initializers and a dense one, both of `tiny_graph`'s network."""
    root = tmp_path_factory.mktemp("resources")
    return {"irregular": sparse_deploy_dir(root / "irregular"),
            "tiny": make_deploy_dir(root / "tiny")}


def copy_of(exported, tmp_path: Path, which: str = "irregular") -> Path:
    return Path(shutil.copytree(exported[which], tmp_path / "deploy"))


def edit_manifest(deploy: Path, **fields) -> None:
    path = deploy / MANIFEST_NAME
    info = json.loads(path.read_text())
    info.update(fields)
    path.write_text(json.dumps(info, indent=2))


def peak_run(args: list[str], cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess,
                                                                          float, float]:
    """Run a console script in a fresh interpreter: its result, seconds, and peak RSS in MB
    (the child reports its own VmHWM: ru_maxrss would carry this process's over the fork)."""
    script = ("import sys\nfrom pathlib import Path\nfrom dnr_deploy.cli import main\n"
              "code = main(sys.argv[1:])\n"
              "status = Path('/proc/self/status').read_text().splitlines()\n"
              "print('PEAK', next(l.split()[1] for l in status if l.startswith('VmHWM')))\n"
              "sys.exit(code)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=cli_env(),
                            capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in result.stdout.splitlines()
                if line.startswith("PEAK"))
    return result, seconds, peak / 1024


def one_line(result: subprocess.CompletedProcess, prog: str, code: int = 2) -> str:
    return assert_clean_error(result.returncode, result.stderr, prog, code)


# -- threads, batches, input shapes ------------------------------------------------------------

@pytest.mark.parametrize(("prog", "main", "flags"), [("dnr-bench", bench_main, FAST_BENCH),
                                                     ("dnr-verify", verify_main, FAST_VERIFY)])
def test_a_million_threads_are_refused_at_once(exported, tmp_path, prog, main, flags):
    deploy = copy_of(exported, tmp_path)
    start = time.perf_counter()
    outcome = call_main(main, [str(deploy), *flags, "--threads", "1000000"], seconds=30)
    line = assert_clean_error(outcome.code, outcome.err, prog)
    assert "--threads" in line and str(resources.max_threads()) in line
    assert time.perf_counter() - start < 10
    assert not (deploy / "reports").exists()


def test_the_thread_cap_follows_the_cpus():
    assert resources.max_threads() == resources.THREADS_PER_CPU * resources.usable_cpus()
    assert resources.check_threads(resources.max_threads(), "--threads", ValueError)
    with pytest.raises(ValueError, match="--threads"):
        resources.check_threads(resources.max_threads() + 1, "--threads", ValueError)


def test_a_batch_of_two_million_is_refused_before_allocating(exported, tmp_path):
    deploy = copy_of(exported, tmp_path)
    result, seconds, peak_mb = peak_run(["bench", str(deploy), *FAST_BENCH, "--batch",
                                         "1,2000000"], tmp_path)
    line = one_line(result, "dnr-bench")
    assert "--batch" in line and "GiB" in line and "available" in line
    assert peak_mb < PEAK_LIMIT_MB, peak_mb
    assert seconds < 60
    assert not (deploy / "reports").exists()


@pytest.mark.parametrize(("prog", "main", "flags"), [("dnr-bench", bench_main, FAST_BENCH),
                                                     ("dnr-verify", verify_main, FAST_VERIFY)])
def test_batches_are_sized_against_the_memory_available(exported, tmp_path, monkeypatch, prog,
                                                        main, flags):
    """The estimate is the graph's: with 256 KiB available even a batch of 64 digits does not fit
    (a dense deploy dir: no sparse initializers, which that budget would refuse first)."""
    deploy = copy_of(exported, tmp_path, "tiny")
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 2**18)
    outcome = call_main(main, [str(deploy), *flags, *(
        ["--batch", "64"] if prog == "dnr-bench" else ["--batch-size", "64", "--dataset",
                                                        "digits"])])
    line = assert_clean_error(outcome.code, outcome.err, prog)
    assert "memory" in line and "batch" in line


def test_a_huge_manifest_input_shape_is_refused(exported, tmp_path):
    deploy = copy_of(exported, tmp_path)
    edit_manifest(deploy, input_shape=[64, 4096, 4096])  # each side in range, 4 GiB an image
    result, _, peak_mb = peak_run(["bench", str(deploy), *FAST_BENCH], tmp_path)
    assert "input_shape" in one_line(result, "dnr-bench")
    assert peak_mb < PEAK_LIMIT_MB, peak_mb


def test_a_graph_of_another_input_shape_is_refused(exported, tmp_path):
    deploy = copy_of(exported, tmp_path)
    edit_manifest(deploy, input_shape=[1, 16, 16])
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    assert "manifest says [1, 16, 16]" in assert_clean_error(outcome.code, outcome.err,
                                                              "dnr-bench")


# -- sparse initializers -----------------------------------------------------------------------

def sparse_bomb(dims: list[int], nnz: int = 1) -> onnx.ModelProto:
    """A few-hundred-byte model whose sparse initializer claims `dims` (densified at load)."""
    values = numpy_helper.from_array(np.ones(nnz, np.float32), "w")
    indices = numpy_helper.from_array(np.arange(nnz, dtype=np.int64), "w_indices")
    weight = helper.make_sparse_tensor(values, indices, dims)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])], "bomb",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dims[-1]])],
        sparse_initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_a_sparse_initializer_claiming_huge_dims_is_refused_with_little_memory(exported,
                                                                               tmp_path):
    deploy = copy_of(exported, tmp_path)
    onnx.save(sparse_bomb([64, 2**28]), str(deploy / "model.onnx"))  # 64 GiB dense, ~200 B
    rehash(deploy, "model.onnx")
    assert (deploy / "model.onnx").stat().st_size < 1000
    for stage in ("bench", "verify"):
        flags = FAST_BENCH if stage == "bench" else FAST_VERIFY
        result, _, peak_mb = peak_run([stage, str(deploy), *flags], tmp_path)
        line = one_line(result, f"dnr-{stage}")
        assert "dense elements" in line and "refused before anything was allocated" in line
        assert peak_mb < PEAK_LIMIT_MB, (stage, peak_mb)


@pytest.mark.parametrize(("dims", "nnz"), [([8, -4], 1), ([2, 2], 5)])
def test_sparse_dims_that_disagree_with_their_values_are_refused(exported, tmp_path, dims, nnz):
    deploy = copy_of(exported, tmp_path)
    onnx.save(sparse_bomb(dims, nnz), str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    assert "sparse tensor" in assert_clean_error(outcome.code, outcome.err, "dnr-bench")


def test_sparse_initializers_beyond_the_manifests_dense_count_are_refused(exported, tmp_path):
    """Within the file-size proportion, but more dense weights than the manifest's network."""
    deploy = copy_of(exported, tmp_path)
    info = json.loads((deploy / MANIFEST_NAME).read_text())
    edit_manifest(deploy, params={**info["params"], "dense": 100})
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    line = assert_clean_error(outcome.code, outcome.err, "dnr-bench")
    assert "dense parameter count" in line


# -- the whole graph: functions, subgraphs, domains ----------------------------------------------

def graph_with_function(tensor: TensorProto) -> onnx.ModelProto:
    """The digits contract (input -> logits) through a model-local function whose body holds a
    Constant node with `tensor`."""
    body = [helper.make_node("Constant", [], ["c"], value=tensor),
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("MatMul", ["f", "c"], ["y"])]
    function = helper.make_function("local.fn", "Head", ["x"], ["y"], body,
                                    [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [helper.make_node("Head", ["input"], ["logits"], domain="local.fn")], "fn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("local.fn", 1)])
    model.ir_version = 8
    return model


def test_external_data_inside_a_function_body_is_refused(exported, tmp_path):
    deploy = copy_of(exported, tmp_path)
    weights = np.ones((64, 10), np.float32)
    (deploy / "head.bin").write_bytes(weights.tobytes())  # the side file exists, unhashed
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[64, 10],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "head.bin"), ("offset", "0"),
                       ("length", str(weights.nbytes))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(graph_with_function(tensor), str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    for prog, main, flags in (("dnr-bench", bench_main, FAST_BENCH),
                              ("dnr-verify", verify_main, FAST_VERIFY)):
        outcome = call_main(main, [str(deploy), *flags])
        line = assert_clean_error(outcome.code, outcome.err, prog)
        assert "external data" in line and "head.bin" in line and "function" in line
    assert not (deploy / "reports").exists()


def test_a_function_without_external_data_passes_the_walk(exported, tmp_path):
    """The walk refuses what it should, not functions as such: the same graph with the
    weights inside gets as far as the size cross-check."""
    deploy = copy_of(exported, tmp_path)
    tensor = numpy_helper.from_array(np.ones((64, 10), np.float32), "c")
    onnx.save(graph_with_function(tensor), str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    assert "does not describe" in assert_clean_error(outcome.code, outcome.err, "dnr-bench")


def unknown_operator(where: str) -> tuple[onnx.NodeProto, list[onnx.OperatorSetIdProto]]:
    """The real model with a custom-domain operator in the main graph, or a standard-domain
    operator that does not exist inside an If branch."""
    if where == "domain":
        node = helper.make_node("Payload", ["input"], ["extra"], domain="evil.custom")
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid("evil.custom", 1)]
    else:
        branch = helper.make_graph(
            [helper.make_node("NoSuchOp", ["input"], ["inner"])], "branch", [],
            [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
        node = helper.make_node("If", ["cond"], ["extra"], then_branch=branch,
                                else_branch=branch)
        opsets = [helper.make_opsetid("", 18)]
    return node, opsets


@pytest.mark.parametrize("where", ["domain", "subgraph"])
def test_unknown_operators_are_refused(exported, tmp_path, where):
    deploy = copy_of(exported, tmp_path)
    model = onnx.load(str(deploy / "model.onnx"))
    node, opsets = unknown_operator(where)
    model.graph.node.append(node)
    if where == "subgraph":
        model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    onnx.save(model, str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    line = assert_clean_error(outcome.code, outcome.err, "dnr-bench")
    assert ("evil.custom" in line) if where == "domain" else ("NoSuchOp" in line and "If" in line)


# -- the manifest's figures against the graph ---------------------------------------------------

def test_the_deploy_dirs_pass_their_own_cross_checks(exported):
    deploy = open_deploy_dir(exported["irregular"])
    assert deploy.graphs["model.onnx"].record() == deploy.manifest["onnx_sizes"]["model.onnx"]
    assert deploy.graphs["model.onnx"].params < 100  # the nonzeros of its sparse weights
    tiny = open_deploy_dir(exported["tiny"])  # a baseline.onnx of twice the MACs
    assert tiny.graphs["baseline.onnx"].macs == 2 * tiny.graphs["model.onnx"].macs


@pytest.mark.slow
@pytest.mark.ci
def test_a_real_export_records_what_opening_recounts(tmp_path):
    """dnr-export's own deploy dir: its onnx_sizes are the graphs' counts, and the graph's MACs
    are the PyTorch-side count (the exporter keeps the weights' shapes)."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    run.mkdir()
    write_fake_run(run, "irregular", 0.05)
    out = export_run(ExportConfig(run_dir=str(run), out=str(tmp_path / "deploy"),
                                  parity_samples=8, baseline=True)).dir
    deploy = open_deploy_dir(out)
    for name, macs in (("model.onnx", "executed"), ("baseline.onnx", "dense")):
        assert deploy.graphs[name].record() == deploy.manifest["onnx_sizes"][name]
        assert deploy.graphs[name].macs == deploy.manifest["macs"][macs]
    shutil.copyfile(out / "baseline.onnx", out / "model.onnx")  # the dense network instead
    rehash(out, "model.onnx")
    outcome = call_main(bench_main, [str(out), *FAST_BENCH])
    assert "does not describe" in assert_clean_error(outcome.code, outcome.err, "dnr-bench")


def test_a_rehashed_model_of_another_network_is_refused(exported, tmp_path):
    """The audit's forgery: model.onnx replaced by another network and its hash updated.
    Before, bench printed the manifest's MACs of the original network."""
    deploy = copy_of(exported, tmp_path)
    onnx.save(tiny_graph(7, channels=32), str(deploy / "model.onnx"))  # twice as wide
    rehash(deploy, "model.onnx")
    for prog, main, flags in (("dnr-bench", bench_main, FAST_BENCH),
                              ("dnr-verify", verify_main, FAST_VERIFY)):
        outcome = call_main(main, [str(deploy), *flags])
        line = assert_clean_error(outcome.code, outcome.err, prog)
        assert "does not describe this model" in line
    assert not (deploy / "reports").exists()


def test_a_manifest_without_onnx_sizes_is_refused(exported, tmp_path):
    deploy = copy_of(exported, tmp_path)
    info = json.loads((deploy / MANIFEST_NAME).read_text())
    del info["onnx_sizes"]
    (deploy / MANIFEST_NAME).write_text(json.dumps(info))
    outcome = call_main(bench_main, [str(deploy), *FAST_BENCH])
    assert "onnx_sizes" in assert_clean_error(outcome.code, outcome.err, "dnr-bench")


def test_an_efficiency_above_its_physical_limit_is_an_error_not_a_figure():
    def model(p50: float, macs: int) -> dict:
        return {"macs": macs, "bytes": 1000, "latency": {"1": {"p50_ms": p50}}}

    honest = bench._compare({"model": model(1.0, 100), "baseline": model(2.0, 200)}, {})
    assert honest["per_batch"]["1"]["efficiency"] == pytest.approx(1.0)
    assert "efficiency_error" not in honest["per_batch"]["1"]
    audited = bench._compare({"model": model(1.0, 100), "baseline": model(6.44, 200)}, {})
    row = audited["per_batch"]["1"]  # 3.22, as the audit saw printed as a figure
    assert row["efficiency"] is None and "3.22 is above its physical limit" in row[
        "efficiency_error"]
    table = bench.format_table({
        "deploy_dir": "d", "granularity": "channel", "session": {
            "providers": ["CPUExecutionProvider"], "intra_op_num_threads": 1,
            "onnxruntime": "x"}, "config": {"runs": 2, "warmup": 0}, "machine": {"cpu": "c"},
        "models": {}, "comparison": audited})
    assert "efficiency ERROR: 3.22 is above" in table and "efficiency 3.22" not in table


# -- the clean-accuracy gate --------------------------------------------------------------------

def test_the_gate_fails_when_clean_accuracy_collapses():
    manifest = {"accuracy": {"clean": 0.947, "autoattack": 0.40},
                "threat_model": {"eps": 0.2}, "robustness": {"images": 100}}
    edited = verdict.compare({"clean": 0.20, "robust": 0.40}, manifest, 0.2, 100, {}, 1.0,
                             None, True)
    assert not edited["passed"] and "clean accuracy" in edited["reasons"][0]
    honest = verdict.compare({"clean": 0.945, "robust": 0.40}, manifest, 0.2, 100, {}, 1.0,
                             None, True)
    assert honest["passed"], honest["reasons"]
    # the same first images' clean figure is the reference when the ensemble recorded one
    same_images = {**manifest, "robustness": {"images": 100, "clean": 0.90}}
    assert verdict.compare({"clean": 0.895, "robust": 0.40}, same_images, 0.2, 100, {}, 1.0,
                           None, True)["passed"]


@pytest.mark.slow
@pytest.mark.ci
def test_a_rehashed_weight_edit_that_kills_clean_accuracy_fails_the_gate(tmp_path):
    """A trained dense run (2 epochs); its final Gemm bias pushed toward one class, model.onnx
    re-hashed: shapes and counts unchanged, so every integrity check passes, robust accuracy
    does not fall (the attack has nothing left to break), and the clean gate catches it."""
    from dnr_deploy.compress.trainer import compress
    from dnr_deploy.compress.training import CompressConfig

    torch.set_num_threads(1)
    run = compress(CompressConfig(out=str(tmp_path / "run"), dense=True, beta=1.0, epochs=2,
                                  eval_samples=50, robust_eval_samples=64)).dir
    deploy = export_run(ExportConfig(run_dir=str(run), out=str(tmp_path / "deploy"),
                                     parity_samples=32)).dir
    flags = ["--steps", "5", "--queries", "50", "--tolerance", "5"]
    honest = call_main(verify_main, [str(deploy), *flags], seconds=300)
    assert honest.code == 0, honest.err
    model = onnx.load(str(deploy / "model.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    shifted = numpy_helper.to_array(bias).copy()
    shifted[0] += 100.0
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    onnx.save(model, str(deploy / "model.onnx"))
    rehash(deploy, "model.onnx")
    open_deploy_dir(deploy)  # hashes, graph walk and size cross-checks all pass
    edited = call_main(verify_main, [str(deploy), *flags], seconds=300)
    assert_clean_error(edited.code, edited.err, "dnr-verify", expected=1)
    comparison = json.loads((deploy / "reports" / "verify.json").read_text())["comparison"]
    assert comparison["clean_drop_points"] > 50
    assert any("clean accuracy of the artifact is" in r for r in comparison["reasons"])
