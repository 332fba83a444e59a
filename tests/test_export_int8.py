"""dnr-export --quantize int8: the int8 graph beside its float original, gated against ONNX
Runtime's reference int8 math; verify attacks it white-box (straight-through rounding) and by
transfer from the float model; bench times both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dnr_deploy.cli import bench_main, export_main, verify_main
from dnr_deploy.deploydir import names
from dnr_deploy.export.quantize import choose_reduce_range, reference_session
from dnr_deploy.runtime.onnx_torch import OPS, load_onnx_torch
from dnr_deploy.runtime.session import create_session, run_logits
from tests.factories import write_fake_run
from tests.test_export_cli import assert_one_line_error, hidden_leftovers
from tests.test_runtime_cli import call

# A fake run's random weights put every image near a tie, so int8 may flip many predictions:
# the accuracy gate is exercised on trained runs (the end-to-end test), not here.
ANY_DROP = ["--int8-max-drop", "100"]


@pytest.fixture(scope="module")
def int8_deploy(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("int8") / "run"
    write_fake_run(run_dir, "channel")
    assert export_main([str(run_dir), "--quantize", "int8", *ANY_DROP]) == 0
    return run_dir / names.DEFAULT_OUT


def test_int8_deploy_dir_keeps_the_float_graph_and_records_the_quantization(int8_deploy):
    manifest = json.loads((int8_deploy / names.MANIFEST_NAME).read_text())
    assert {names.MODEL_FILE, names.FP32_MODEL_FILE} <= set(manifest["files"])
    record = manifest["quantization"]
    assert record["format"] == "QDQ" and record["calibration_split"] == "train"
    assert record["calibration_images"] == 256
    assert isinstance(record["reduce_range"], bool) and record["reduce_range_reason"]
    assert 0 <= record["int8_vs_reference_max_abs"] <= record["int8_atol"]
    graph = onnx.load(str(int8_deploy / names.MODEL_FILE)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    assert sizes[names.MODEL_FILE] < 0.6 * sizes[names.FP32_MODEL_FILE]


def test_reimported_int8_graph_is_the_reference_int8_math_with_a_gradient(int8_deploy):
    path = int8_deploy / names.MODEL_FILE
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = reference_session(path).run(None, {names.INPUT_NAME: x.numpy()})[0]
    graph = load_onnx_torch(str(path))
    with torch.no_grad():
        ours = graph(x).numpy()
    assert np.abs(ours - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())
    deployed = run_logits(create_session(path)[0], x.numpy())
    assert np.abs(deployed - reference).max() <= 0.25  # the export's default int8_atol
    xr = x.clone().requires_grad_(True)
    graph(xr)[:, 3].sum().backward()
    assert xr.grad.abs().sum() > 0  # rounding passed straight through, not a zero gradient


def test_reduce_range_follows_vnni():
    assert choose_reduce_range("auto", {"avx2", "fma"}).reduce_range
    assert not choose_reduce_range("auto", {"avx2", "avx512_vnni"}).reduce_range
    assert not choose_reduce_range("auto", {"avx_vnni"}).reduce_range
    assert not choose_reduce_range("off", {"avx2"}).reduce_range
    assert choose_reduce_range("on", {"avx512_vnni"}).reduce_range


def test_bad_quantize_requests_fail_cleanly(tmp_path, capsys):
    irregular = tmp_path / "irregular"
    write_fake_run(irregular, "irregular")
    code = export_main([str(irregular), "--quantize", "int8", "--format", "csr"])
    line = assert_one_line_error(code, capsys.readouterr().err)
    assert "use --format onnx" in line
    assert not (irregular / names.DEFAULT_OUT).exists() and hidden_leftovers(irregular) == []

    channel = tmp_path / "channel"
    write_fake_run(channel, "channel")
    result = call(export_main, [str(channel), "--quantize", "int8", "--reduce-range", "maybe"],
                  capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # a gate that ran and failed: exit 1, nothing written
    code = export_main([str(channel), "--quantize", "int8", *ANY_DROP, "--int8-atol", "1e-30",
                        "--reduce-range", "off"])
    err = capsys.readouterr().err
    if code == 0:  # this CPU's kernels matched the reference exactly: nothing to catch
        pytest.skip("int8 kernels equal the reference int8 math here")
    line = assert_one_line_error(code, err, expected=1)
    assert "reference int8 math" in line
    assert not (channel / names.DEFAULT_OUT).exists() and hidden_leftovers(channel) == []


def test_verify_attacks_int8_by_its_own_gradients_and_by_transfer(int8_deploy, capsys):
    out = int8_deploy.parent / "verify"
    result = call(verify_main, [str(int8_deploy), "--n", "24", "--steps", "3", "--queries", "20",
                                "--targets", "2", "--no-gate", "--out", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "verify.json").read_text())
    stages = [(stage["gradients"], stage["attack"]) for stage in report["stages"]]
    assert stages == [("model", "apgd-ce"), ("model", "apgd-t"), ("model", "square"),
                      ("transfer", "apgd-ce"), ("transfer", "apgd-t")]
    assert "model.fp32.onnx" in report["attack"]["gradients"]
    assert report["fidelity"]["atol"] == pytest.approx(0.25)
    assert report["fidelity"]["clean_max_abs"] <= report["fidelity"]["atol"]


def test_bench_times_int8_against_its_float_original(int8_deploy, capsys):
    out = int8_deploy.parent / "bench"
    result = call(bench_main, [str(int8_deploy), "--runs", "3", "--warmup", "1", "--batch", "1,4",
                               "--out", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["models"]["float"]["file"] == names.FP32_MODEL_FILE
    assert set(report["int8_vs_float"]["speedup"]) == {"1", "4"}
    assert report["int8_vs_float"]["file_size_ratio"] > 1.5
    assert "int8 vs float" in result.stdout


def test_quantize_linear_rounds_straight_through_and_clips_like_the_relu_it_holds():
    x = torch.tensor([-1.0, -0.01, 0.25, 0.75, 0.74, 300.0], requires_grad=True)
    scale, zero_point = torch.tensor(0.5), torch.tensor(0, dtype=torch.uint8)
    (q,) = OPS["QuantizeLinear"]([x, scale, zero_point], {})
    assert q.tolist() == [0, 0, 0, 2, 1, 255]  # half to even (0.5 -> 0, 1.5 -> 2), saturated
    (restored,) = OPS["DequantizeLinear"]([q, scale, zero_point], {})
    restored.sum().backward()
    # rounding: gradient 1; clipped (the ReLU the quantizer folded in, and saturation): 0
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 0]
