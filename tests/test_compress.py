"""dnr-compress end to end on the embedded default: density, channels, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

import dnr_deploy
from dnr_deploy.cli import compress_main
from dnr_deploy.compress import trainer as compress_module
from dnr_deploy.compress.checkpoint import load_checkpoint, read_run_json
from dnr_deploy.compress.trainer import compress
from dnr_deploy.compress.training import (
    CompressConfig,
    ConfigError,
    HybridObjective,
    TrainingDiverged,
    TrainingInterrupted,
)
from dnr_deploy.models import create_model
from dnr_deploy.sparsity.groups import find_channel_groups
from dnr_deploy.sparsity.policy import ChannelDNR, IrregularDNR
from tests.helpers import REPO, assert_clean_failure, run_cli

FAST = {"epochs": 3, "eval_samples": 100, "robust_eval_samples": 48}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # runs/ and runs/LATEST land here
    return tmp_path


@pytest.mark.slow
def test_irregular_run_hits_target_density_and_moves_layers(in_tmp):
    run = dnr_deploy.compress(CompressConfig(out="irr", **FAST))
    summary = read_run_json(run.dir)
    assert summary["density"]["achieved"] == pytest.approx(0.05, rel=0.005)
    layers = summary["layer_densities"]
    assert len(layers) == 5
    assert max(abs(d - 0.05) for d in layers.values()) > 0.01  # no longer uniform
    assert (run.dir / "plots" / "layer_densities.png").stat().st_size > 1000
    assert set(summary["accuracy"]) == {"clean", "fgsm", "pgd7", "pgd20", "autoattack"}
    assert summary["accuracy"]["autoattack"] <= summary["accuracy"]["pgd20"] + 0.02
    robustness = summary["robustness"]
    assert robustness["robust"] == summary["accuracy"]["autoattack"]
    assert [s["attack"] for s in robustness["stages"]] == ["apgd-ce", "apgd-t", "square"]
    assert robustness["protocol"]["apgd_steps"] == 100
    assert robustness["max_perturbation"] <= 0.2 + 1e-6
    assert summary["accuracy"]["clean"] > 0.5  # it learned something in 3 epochs
    assert summary["accuracy"]["pgd20"] <= summary["accuracy"]["clean"]
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # LATEST lives beside the run it names (here the working folder), never in runs/
    assert (in_tmp / "LATEST").read_text().strip() == "irr"
    assert not (in_tmp / "runs").exists()
    state = load_checkpoint(run.dir)
    nonzero = sum(int(state["model"][n].count_nonzero()) for n in state["policy"]["masks"])
    total = sum(m.numel() for m in state["policy"]["masks"].values())
    assert nonzero <= round(0.05 * total)  # masked weights really are zero in the checkpoint


@pytest.mark.slow
def test_channel_run_reports_the_size_of_the_physically_smaller_network(in_tmp):
    run = compress(CompressConfig(out="ch", granularity="channel", **FAST))
    summary = read_run_json(run.dir)
    state = load_checkpoint(run.dir)
    model = create_model("small", 10, 1, summary["mean"], summary["std"])
    model.load_state_dict(state["model"])
    example = torch.zeros(1, 1, 8, 8)
    groups = {g.name: g for g in find_channel_groups(model, example)}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    for name, on in state["policy"]["channel_masks"].items():
        group = groups[name]
        for conv in group.convs:  # every unit is fully on or fully off in the weights
            alive = modules[conv].weight.flatten(1).abs().sum(1) > 0
            assert torch.equal(alive, on)
        off = (~on).nonzero().flatten().tolist()
        if off:
            graph.get_pruning_group(modules[group.convs[0]], tp.prune_conv_out_channels,
                                    idxs=off).prune()
    assert summary["params"]["deployed"] == sum(p.numel() for p in model.parameters())
    assert summary["macs"]["reduction_executed"] > 5
    assert 0.04 < summary["density"]["achieved"] <= 0.05


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(in_tmp):
    cfg = {"epochs": 4, "eval_samples": 50, "seed": 3, "robust_eval_samples": 48}
    compress(CompressConfig(out="straight", **cfg))
    stopped = compress(CompressConfig(out="split", stop_after=2, **cfg))
    assert load_checkpoint(stopped.dir)["epoch"] == 2
    assert not (stopped.dir / "run.json").exists()
    assert compress_main(["--resume", "split"]) == 0
    straight, split = load_checkpoint("straight"), load_checkpoint("split")
    assert split["epoch"] == straight["epoch"] == 4
    for name, mask in straight["policy"]["masks"].items():
        assert torch.equal(mask, split["policy"]["masks"][name]), name
    for name, tensor in straight["model"].items():
        assert torch.allclose(tensor.float(), split["model"][name].float(), atol=1e-6), name
    assert read_run_json(Path("split"))["accuracy"] == read_run_json(Path("straight"))["accuracy"]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("granularity", ["channel", "irregular"])
def test_library_resume_takes_the_checkpoints_settings(in_tmp, granularity):
    """`compress(CompressConfig(resume=RUN))` continues RUN as trained (its granularity,
    density, seed ...), exactly as `dnr-compress --resume RUN` does."""
    settings = {"epochs": 2, "eval_samples": 20, "pgd_steps": 2, "density": 0.1, "seed": 5}
    compress(CompressConfig(out="run", granularity=granularity, stop_after=1, **settings))
    run = compress(CompressConfig(resume="run", robust_eval_samples=8))
    assert run.summary["granularity"] == granularity
    assert run.summary["config"]["density"] == 0.1 and run.summary["config"]["seed"] == 5
    assert run.summary["robustness"]["images"] == 8  # this invocation's own setting
    with pytest.raises(ConfigError, match="trained with density=0.1"):
        compress(CompressConfig(resume="run", density=0.2))


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_checkpoint_and_resumes(in_tmp, monkeypatch):
    real = compress_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_module, "train_one_epoch", interrupted)
    with pytest.raises(TrainingInterrupted, match="checkpoint of epoch 1"):
        compress(CompressConfig(out="run", **FAST))
    assert load_checkpoint("run")["epoch"] == 1
    assert compress_main(["--resume", "run"]) == 0
    assert load_checkpoint("run")["epoch"] == 3


@pytest.mark.slow
@pytest.mark.ci
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(in_tmp, monkeypatch,
                                                                       capsys):
    real = HybridObjective.__call__
    calls = {"n": 0}

    def poisoned(self, model, x, y, attack_model=None):
        calls["n"] += 1
        result = real(self, model, x, y, attack_model)
        if calls["n"] > 30:  # partway into epoch 2 (23 batches an epoch)
            result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(HybridObjective, "__call__", poisoned)
    assert compress_main(["--out", "run", "--epochs", "3", "--eval-samples", "50"]) == 1
    err = capsys.readouterr().err
    assert "loss became nan" in err and "checkpoint of epoch 1" in err
    assert load_checkpoint("run")["epoch"] == 1
    with pytest.raises(TrainingDiverged):
        compress(CompressConfig(resume="run", **FAST))


@pytest.mark.parametrize("args", [
    ["--density", "0"], ["--density", "1.5"], ["--density", "-0.1"], ["--model", "alexnet"],
    ["--dataset", "mnist"], ["--dataset", "cifar10"], ["--granularity", "block"],
    ["--dataset", "cifar10", "--data-dir", "does-not-exist"], ["--eps", "2"],
    ["--config", "missing.yaml"],
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(in_tmp, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        code = compress_main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dnr-compress: error:"), err
    assert not (in_tmp / "runs").exists()


def test_empty_data_folder_and_corrupt_checkpoint_fail_cleanly(in_tmp):
    (in_tmp / "empty").mkdir()
    result = run_cli(["compress", "--dataset", "cifar100", "--data-dir", "empty"], in_tmp)
    assert_clean_failure(result)
    assert "missing or empty" in result.stderr
    good = torch.save({"format": "x"}, in_tmp / "other.pt")
    assert good is None
    (in_tmp / "truncated.pt").write_bytes((in_tmp / "other.pt").read_bytes()[:40])
    for name in ("truncated.pt", "other.pt", "nothing-here.pt"):
        result = run_cli(["compress", "--resume", name], in_tmp)
        assert_clean_failure(result)
    assert sorted(p.name for p in in_tmp.iterdir()) == ["empty", "other.pt", "truncated.pt"]


def test_an_empty_or_non_mapping_recipe_is_bad_input(in_tmp, capsys):
    (in_tmp / "empty.yaml").write_text("# nothing here\n")
    (in_tmp / "list.yaml").write_text("- density\n")
    for name in ("empty.yaml", "list.yaml"):
        assert compress_main(["--config", name]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and name in err, err
    assert not (in_tmp / "runs").exists()


def test_recipe_then_flags_win(in_tmp):
    from dnr_deploy.cli import build_compress_parser, compress_config_from

    (in_tmp / "r.yaml").write_text("density: 0.1\nepochs: 7\nmodel: vgg16\n")
    args = build_compress_parser().parse_args(["--config", "r.yaml", "--epochs", "2"])
    config = compress_config_from(args)
    assert (config.density, config.epochs, config.model, config.beta) == (0.1, 2, "vgg16", 0.5)


@pytest.mark.parametrize("recipe", sorted((REPO / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_is_a_valid_config(recipe):
    from dnr_deploy.config import load_recipe

    settings = load_recipe(recipe, CompressConfig)
    config = CompressConfig(**{**settings, "device": "cpu"}).resolved()
    assert config.density == 0.05
    if config.dataset != "digits":
        assert config.epochs == 200 and config.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
@pytest.mark.parametrize("granularity", ["irregular", "channel"])
def test_paper_models_train_two_batches_at_32x32(name, granularity):
    torch.manual_seed(0)
    model = create_model(name, 10, 3, [0.5] * 3, [0.25] * 3)
    example = torch.zeros(1, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    policy = (ChannelDNR(model, 0.05, generator, example) if granularity == "channel"
              else IrregularDNR(model, 0.05, generator))
    config = CompressConfig(model=name, dataset="cifar10", pgd_steps=2).resolved()
    objective = HybridObjective(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = dict(model.named_parameters())
    for _ in range(2):
        result = objective(model, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        assert torch.isfinite(result["loss"])
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        policy.on_step_end(model)
    for pname, mask in policy.masks.items():
        assert torch.count_nonzero(params[pname][~mask]) == 0
    density = policy.density()
    policy.rewire(model, optimizer, 0.5)
    assert policy.density() == pytest.approx(density, abs=0.005)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--start-density", "0.04"], "start_density must be in [density, 1]"),
    (["--start-density", "1.0", "--method", "static"], "start_density is for --method dnr"),
    (["--start-density", "1.0", "--epochs", "1", "--rewire-every", "100"],
     "start_density 1 needs a rewire"),
])
def test_start_density_bad_settings_are_one_line(tmp_path, monkeypatch, capsys, flags, expected):
    from dnr_deploy.cli import compress_main

    monkeypatch.chdir(tmp_path)
    code = compress_main([*flags, "--out", "run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_dnr_starts_dense_by_default_where_it_measured_better():
    """Unset, irregular DNR starts dense when the run has a rewire to close in on the target;
    channel DNR, a run with no rewire and the baselines start at the target (None)."""
    assert CompressConfig().with_start_density(rewires=6).start_density == 1.0
    assert CompressConfig().with_start_density(rewires=0).start_density is None
    assert CompressConfig(granularity="channel").with_start_density(6).start_density is None
    assert CompressConfig(method="static").with_start_density(6).start_density is None
    assert CompressConfig(start_density=0.05).with_start_density(6).start_density == 0.05
    with pytest.raises(ConfigError, match="needs a rewire"):
        CompressConfig(start_density=0.5).with_start_density(rewires=0)


def test_a_checkpoint_from_before_channel_shares_resumes_with_size_shares():
    """Channel runs checkpointed before --channel-shares existed regrew by size; the default is
    now cost, and a resume must continue such a run as it was trained."""
    from dnr_deploy.compress.training import merge_resume

    old = {k: v for k, v in vars(CompressConfig(granularity="channel")).items()
           if k != "channel_shares"}
    assert merge_resume(CompressConfig(resume="run"), old, "old").channel_shares == "size"
    new = {**old, "channel_shares": "cost"}
    assert merge_resume(CompressConfig(resume="run"), new, "new").channel_shares == "cost"
    assert CompressConfig().channel_shares == "cost"


def test_rewire_until_defaults_by_granularity():
    """Channel DNR settles its widths early and rewiring on costs robustness (docs/results.md),
    so its topology freezes at 35% of training; irregular DNR's at 75%. A value given wins,
    and resolving records the number, so run.json says which was used."""
    assert CompressConfig().resolved().rewire_until == 0.75
    assert CompressConfig(granularity="channel").resolved().rewire_until == 0.35
    assert CompressConfig(granularity="channel", rewire_until=0.75).resolved().rewire_until == 0.75
    assert CompressConfig(granularity="channel").rewire_schedule().until == 0.35
