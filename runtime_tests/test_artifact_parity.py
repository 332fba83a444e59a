"""Every form of the deployed model computes the same function: ONNX Runtime, the PyTorch
re-import verify attacks, the PyTorch weights, and (for its figures) the baseline. An int8
deploy dir's float forms are compared with its model.fp32.onnx, and its int8 model.onnx with
its re-import within the export's int8 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dnr_deploy.runtime.onnx_torch import load_onnx_torch
from dnr_deploy.runtime.session import create_session, run_logits

ATOL = 1e-4  # the parity gate of export and verify


def float_file(deploy) -> str:
    """The float graph: model.onnx, or model.fp32.onnx beside an int8 model.onnx."""
    return "model.fp32.onnx" if "model.fp32.onnx" in deploy.manifest["files"] else "model.onnx"


@pytest.fixture(scope="module")
def ort_logits(deploy, test_images):
    session, _ = create_session(deploy.path / float_file(deploy))
    return run_logits(session, test_images[0].numpy())


@pytest.mark.parametrize("name", ["model.onnx", "model.fp32.onnx"])
def test_reimport_equals_onnx_runtime(deploy, test_images, name):
    if name not in deploy.manifest["files"]:
        pytest.skip(f"no {name} (not an int8 deploy dir)")
    quantized = name == "model.onnx" and float_file(deploy) != name
    atol = deploy.manifest["quantization"]["int8_atol"] if quantized else ATOL
    graph = load_onnx_torch(str(deploy.path / name))
    x = test_images[0]
    noise = torch.rand(16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    session, _ = create_session(deploy.path / name)
    with torch.no_grad():
        ours = torch.cat([graph(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
        on_noise = graph(noise).numpy()
    assert np.abs(ours - run_logits(session, x.numpy())).max() <= atol
    assert np.abs(on_noise - run_logits(session, noise.numpy())).max() <= atol


def test_pytorch_weights_equal_onnx_runtime(deploy, test_images, ort_logits):
    from dnr_deploy.export import load_deployed_model
    from dnr_deploy.export.onnx import torch_logits

    files = deploy.manifest["files"]
    if "weights.csr.npz" not in files and "weights.npz" not in files:
        pytest.skip("this deploy dir holds no PyTorch weights")
    model = load_deployed_model(deploy.path)
    assert np.abs(torch_logits(model, test_images[0]) - ort_logits).max() <= ATOL


def test_baseline_is_the_same_function(deploy, test_images, ort_logits):
    """baseline.onnx is the unpruned architecture holding the deployed weights (zeros where
    pruned), so bench compares equal functions at different cost."""
    if "baseline.onnx" not in deploy.manifest["files"]:
        pytest.skip("exported without --baseline")
    session, _ = create_session(deploy.path / "baseline.onnx")
    baseline = run_logits(session, test_images[0].numpy())
    assert np.abs(baseline - ort_logits).max() <= 2 * ATOL


def test_clean_accuracy_is_the_training_side_figure(deploy, test_images, ort_logits):
    x, y, total = test_images
    if len(x) < total:
        pytest.skip("--n scores a subset; the training-side figure is on the whole split")
    correct = int((ort_logits.argmax(1) == y.numpy()).sum())
    expected = deploy.manifest["accuracy"]["clean"] * total
    assert abs(correct - expected) <= 1.01  # a near-tie may flip one image
