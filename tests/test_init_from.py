"""--init-from: pretrained weights matched by name and shape, read as data (never unpickled)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from dnr_deploy import data
from dnr_deploy.compress.config import CompressConfig, ConfigError
from dnr_deploy.compress.evaluation import evaluate
from dnr_deploy.compress.init_weights import load_initial_weights
from dnr_deploy.compress.training import build_model

DIGITS = data.SPECS[data.DatasetName.DIGITS]


def fresh(seed: int, model: str = "small") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(CompressConfig(model=model), DIGITS)


def test_a_state_dict_loads_by_name_and_shape(tmp_path: Path) -> None:
    source, target = fresh(1), fresh(2)
    file = tmp_path / "w.pt"
    torch.save(source.state_dict(), file)
    report = load_initial_weights(target, file, quiet=True)
    assert report["loaded"] == report["of"] and not report["missing"] and not report["skipped"]
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name


def test_torchvision_style_names_skip_what_does_not_fit(tmp_path: Path, capsys) -> None:
    """A body's own names (no leading "1."), a head of another class count, safetensors."""
    from safetensors.torch import save_file

    source, target = fresh(1, "torchvision:resnet18"), fresh(2, "torchvision:resnet18")
    body = {name.split(".", 1)[1]: t.contiguous() for name, t in source.state_dict().items()
            if name.startswith("1.")}
    body["fc.weight"] = torch.zeros(1000, 512)  # ImageNet's head: skipped, said so
    body.pop("fc.bias")
    save_file(body, str(tmp_path / "w.safetensors"))
    report = load_initial_weights(target, tmp_path / "w.safetensors")
    assert report["missing"] == ["1.fc.bias"]
    assert report["skipped"] == ["1.fc.weight (1000x512 in the file, 10x512 here)"]
    assert torch.equal(target.state_dict()["1.conv1.weight"], body["conv1.weight"])
    line = capsys.readouterr().err
    assert "loaded" in line and "1.fc.weight" in line and "1.fc.bias" in line


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content", [b"not a checkpoint", pickle.dumps({"w": Payload()}),
                                     pickle.dumps([1, 2])], ids=["junk", "code", "list"])
def test_files_that_are_not_weights_are_refused(tmp_path: Path, capsys, content) -> None:
    file = tmp_path / "w.pt"
    file.write_bytes(content)
    with pytest.raises(ConfigError, match="init-from"):
        load_initial_weights(fresh(0), file)
    assert "unpickled!" not in capsys.readouterr().out


def test_weights_that_fit_nothing_are_refused(tmp_path: Path) -> None:
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="none of its 1 tensors"):
        load_initial_weights(fresh(0), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="no such file"):
        load_initial_weights(fresh(0), tmp_path / "missing.pt")


@pytest.mark.slow
@pytest.mark.ci
def test_init_from_a_dense_run_keeps_its_clean_accuracy(tmp_path: Path) -> None:
    """The weights of a dense run, saved as a plain state_dict, give a new run the accuracy
    that run had before any training; the new run records what it loaded."""
    from dnr_deploy.compress.trainer import compress

    settings = {"dense": True, "epochs": 1, "beta": 1.0, "eval_samples": 64,
                "robust_eval_samples": 2}
    run = compress(CompressConfig(**settings, out=str(tmp_path / "dense")))
    state = torch.load(tmp_path / "dense" / "checkpoint.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "dense.pt")
    model = fresh(5)
    load_initial_weights(model, tmp_path / "dense.pt", quiet=True)
    x, y = data.test_subset(data.load_data("digits"), None)
    clean = evaluate(model, x, y, {}, torch.device("cpu"))["clean"]
    assert clean == pytest.approx(run.summary["accuracy"]["clean"], abs=1e-9)
    again = compress(CompressConfig(**settings, init_from=str(tmp_path / "dense.pt"),
                                    out=str(tmp_path / "again")))
    assert again.summary["init_from"]["loaded"] == again.summary["init_from"]["of"]
