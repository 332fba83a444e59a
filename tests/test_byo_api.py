"""Bring your own model from Python: `compress(config, model=, train_data=, test_data=)` and
`export_run(config, model=)`, run through the README's example; the errors that say what to
pass; DataLoaders; resume with the module."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import dnr_deploy
from dnr_deploy.attacks.ensemble import EnsembleConfig
from dnr_deploy.compress import trainer as trainer_module
from dnr_deploy.compress.checkpoint import load_checkpoint, read_run_json
from dnr_deploy.compress.training import CompressConfig, ConfigError
from dnr_deploy.data import DataError, load_data
from dnr_deploy.deploydir import ManifestError
from dnr_deploy.export import ExportConfig, ExportError, export_run, load_deployed_model
from dnr_deploy.export import onnx as onnx_io
from dnr_deploy.runtime.verify import VerifyConfig, VerifyWarning, verify
from tests.byo_example import TwoBranch
from tests.helpers import REPO, assert_clean_failure, run_cli

# One short epoch: enough to exercise every stage, not to learn.
TINY = {"epochs": 1, "pgd_steps": 1, "batch_size": 32, "eval_samples": 32,
        "robust_eval_samples": 4}
TINY_ARGS = ", ".join(f"{key}={value}" for key, value in TINY.items())


def readme_example() -> str:
    """The Python block of the README's "From Python: a module and datasets"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("#### From Python: a module and datasets"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def quick_robustness():
    """A token robustness ensemble: these tests are about the API, not the attacks."""
    real = trainer_module.robust_evaluation
    quick = EnsembleConfig(apgd_steps=5, target_classes=1, square_queries=20)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "robust_evaluation",
                      lambda *args, **kwargs: real(*args, **{**kwargs, "config": quick}))
        yield patch


@pytest.fixture(scope="module")
def example(tmp_path_factory, quick_robustness) -> dict:
    """The README's example, run as written but for one short epoch: its namespace."""
    code = readme_example()
    assert "epochs=20" in code
    quick_robustness.chdir(tmp_path_factory.mktemp("readme"))
    namespace = {"__name__": "__main__"}
    exec(compile(code.replace("epochs=20", TINY_ARGS), "README.md", "exec"), namespace)
    return namespace


def digits_sets(train: int, test: int) -> tuple[TensorDataset, TensorDataset]:
    bundle = load_data("digits")
    x_train, y_train = bundle.train.tensors
    x_test, y_test = bundle.test.tensors
    return (TensorDataset(x_train[:train], y_train[:train]),
            TensorDataset(x_test[:test], y_test[:test]))


def test_readme_example_compresses_exports_and_verifies(example):
    run, deployed = example["run"], example["deployed"]
    recorded = read_run_json(run.dir)
    assert recorded["model"]["name"] == "<module: __main__.TwoBranch>"
    assert recorded["api_data"] == ["train", "test"]
    assert recorded["config"]["dataset"] == "digits"
    assert recorded["density"]["achieved"] == pytest.approx(0.1, rel=0.01)
    assert set(load_checkpoint(run.dir)) >= {"model", "optimizer", "policy", "rng", "history"}
    parity = deployed.manifest["parity"]
    assert parity["argmax_agree"] == parity["n_images"] == 360
    assert parity["onnx_vs_torch_max_abs"] <= 1e-4
    assert deployed.manifest["model"]["name"] == recorded["model"]["name"]
    # The deployed weights load into the module again and compute what ONNX Runtime does.
    x = torch.rand(8, 1, 8, 8)
    loaded = load_deployed_model(deployed.dir, model=example["TwoBranch"]())
    ort = onnx_io.run_session(onnx_io.open_session(deployed.dir / "model.onnx"), x)
    np.testing.assert_allclose(onnx_io.torch_logits(loaded, x), ort, atol=1e-4, rtol=0)
    with warnings.catch_warnings():  # one epoch: the sanity checks may well flag the net
        warnings.simplefilter("ignore", VerifyWarning)
        result = verify(VerifyConfig(deploy_dir=str(deployed.dir), attack="pgd", steps=2, n=16,
                                     no_gate=True, examples=2))
    assert result.passed and result.report["images"]["first"] == 16
    assert result.report["fidelity"]


def test_export_and_verify_read_your_test_data(example, tmp_path):
    """export_run's parity gates and verify take the user's test data instead of the named
    dataset's test split; data of the wrong shape is one DataError, nothing written."""
    _, mine = digits_sets(0, 40)
    deployed = export_run(ExportConfig(run_dir=str(example["run"].dir), out=str(tmp_path / "d")),
                          model=example["TwoBranch"](), test_data=mine)
    assert deployed.manifest["parity"]["n_images"] == deployed.manifest["parity"][
        "argmax_agree"] == 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        report = dnr_deploy.verify(VerifyConfig(deploy_dir=str(deployed.dir), attack="pgd",
                                                steps=2, n=40, no_gate=True, examples=0),
                                   test_data=DataLoader(mine, batch_size=8)).report
    assert report["images"]["of"] == report["images"]["first"] == 40
    assert report["images"]["split"] == "test_data (Python API)"
    wrong = TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match=r"test_data\[0\]'s image must be a float32 tensor"):
        export_run(ExportConfig(run_dir=str(example["run"].dir), out=str(tmp_path / "e")),
                   model=example["TwoBranch"](), test_data=wrong)
    assert not (tmp_path / "e").exists()
    with pytest.raises(DataError, match=r"test_data"):
        dnr_deploy.verify(VerifyConfig(deploy_dir=str(deployed.dir)), test_data=wrong)


def test_export_without_the_module_says_what_to_pass(example, tmp_path):
    with pytest.raises(ExportError, match=r"model=") as caught:
        export_run(ExportConfig(run_dir=str(example["run"].dir), out=str(tmp_path / "d")))
    message = str(caught.value)
    assert "<module: __main__.TwoBranch>" in message and "MODULE:FACTORY" in message
    assert "\n" not in message
    with pytest.raises(ManifestError, match=r"model="):
        load_deployed_model(example["deployed"].dir)
    run_dir = str(example["run"].dir.absolute())
    result = run_cli(["export", run_dir, "--out", str(tmp_path / "d")], tmp_path)
    assert_clean_failure(result)
    assert "export_run(config, model=...)" in result.stderr


@pytest.mark.parametrize("wrong, problem", [
    # another class whose convs have no bias: the checkpoint holds entries it lacks
    (lambda ns: TwoBranch(10, 1), r"unexpected 1\.wide\.0\.bias"),
    (lambda ns: ns["TwoBranch"](num_classes=5), r"1\.head\.5\.weight is \(10, 32\), not \(5, 32\)"),
])
def test_export_into_a_module_that_does_not_fit_is_one_clear_error(example, tmp_path, wrong,
                                                                   problem):
    with pytest.raises(ExportError, match=problem) as caught:
        export_run(ExportConfig(run_dir=str(example["run"].dir), out=str(tmp_path / "d")),
                   model=wrong(example))
    assert "does not fit the checkpoint" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "d").exists()


def test_dataloaders_resume_and_a_factory_spec(quick_robustness, tmp_path):
    """DataLoaders stand in for Datasets; a stopped channel run resumes with the module passed
    again and exports into it; a module with a MODULE:FACTORY spec is recorded by the spec,
    which export rebuilds alone."""
    quick_robustness.chdir(tmp_path)
    train, test = digits_sets(96, 48)
    loaders = {"train_data": DataLoader(train, batch_size=32, shuffle=True),
               "test_data": DataLoader(test, batch_size=100)}
    config = CompressConfig(**{**TINY, "epochs": 2}, granularity="channel", out="loaders",
                            stop_after=1)
    stopped = dnr_deploy.compress(config, model=TwoBranch(10, 1), **loaders)
    assert stopped.summary == {"stopped_after_epoch": 1}
    with pytest.raises(ConfigError, match=r"compress\(config, model=\.\.\.\) to resume"):
        dnr_deploy.compress(CompressConfig(resume="loaders"), **loaders)
    run = dnr_deploy.compress(CompressConfig(resume="loaders"), model=TwoBranch(10, 1),
                              **loaders)
    recorded = read_run_json(run.dir)
    assert recorded["model"]["name"] == "<module: tests.byo_example.TwoBranch>"
    assert recorded["timing"]["epochs"] == 2 and recorded["api_data"] == ["train", "test"]
    deployed = export_run(ExportConfig(run_dir=str(run.dir), parity_samples=32),
                          model=TwoBranch(10, 1))
    assert deployed.manifest["macs"]["executed"] < deployed.manifest["macs"]["dense"]
    x = torch.rand(8, 1, 8, 8)
    loaded = load_deployed_model(deployed.dir, model=TwoBranch(10, 1))  # history replayed
    ort = onnx_io.run_session(onnx_io.open_session(deployed.dir / "model.onnx"), x)
    np.testing.assert_allclose(onnx_io.torch_logits(loaded, x), ort, atol=1e-4, rtol=0)

    spec = "tests.byo_example:two_branch"
    run = dnr_deploy.compress(CompressConfig(**TINY, model=spec, out="spec"),
                              model=TwoBranch(10, 1), train_data=train,
                              test_data=Subset(test, range(32)))
    assert read_run_json(run.dir)["model"]["name"] == spec
    deployed = dnr_deploy.export_run(dnr_deploy.ExportConfig(run_dir=str(run.dir), model=spec,
                                                             parity_samples=32))
    assert deployed.manifest["parity"]["argmax_agree"] == 32


@pytest.mark.parametrize("data, error, match", [
    (TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4).long()), DataError,
     r"float32 tensor of \(1, 8, 8\).*got torch.float32 \(3, 8, 8\)"),
    (TensorDataset(torch.rand(4, 1, 8, 8) * 255, torch.zeros(4).long()), DataError,
     r"\[0, 1\]"),
    (TensorDataset(torch.rand(4, 1, 8, 8), torch.full((4,), 10)), DataError,
     r"integer class in \[0, 10\)"),
    (TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4)), DataError, r"integer class"),
    ([torch.rand(1, 8, 8)], DataError, r"\(image, label\) pair"),
    (TensorDataset(torch.rand(0, 1, 8, 8), torch.zeros(0).long()), DataError, "is empty"),
    (DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4).long()), batch_size=8),
     ConfigError, "batch_size is 64"),
])
def test_bad_data_is_refused_before_training(tmp_path, monkeypatch, data, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        dnr_deploy.compress(CompressConfig(out="never"), model=TwoBranch(10, 1), train_data=data)
    assert not Path("never").exists()


@pytest.mark.parametrize("model, match", [
    ("small", "must be an nn.Module instance"),
    (TwoBranch(5, 1), "gives 5 logits; the dataset has 10 classes"),
    (TwoBranch(10, 3), "cannot run at this dataset's input size 1x8x8"),
])
def test_a_module_that_cannot_be_trained_is_refused(tmp_path, monkeypatch, model, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match):
        dnr_deploy.compress(CompressConfig(out="never"), model=model)
    assert not Path("never").exists()


def test_a_spec_that_builds_other_parameters_than_the_module_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="is not what 'tests.byo_example:two_branch' builds"):
        dnr_deploy.compress(CompressConfig(model="tests.byo_example:two_branch", out="never"),
                            model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
