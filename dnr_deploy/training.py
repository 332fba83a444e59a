"""The pieces of a compress run: its config, the hybrid objective, one training epoch, the
learning-rate schedule and the choice of sparsity policy. `trainer.py` drives them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dnr_deploy.attacks import pgd
from dnr_deploy.checkpoint import CheckpointError
from dnr_deploy.config import RecipeError, coerce, option
from dnr_deploy.data import SPECS, parse_dataset
from dnr_deploy.models import ModelSpecError, check_model_spec, create_model
from dnr_deploy.sparsity.groups import ChannelGraphError
from dnr_deploy.sparsity.masks import Granularity, Init
from dnr_deploy.sparsity.policy import (
    ChannelDNR,
    DensePolicy,
    IrregularDNR,
    MagnitudePrune,
    StaticChannels,
    StaticSparse,
)
from dnr_deploy.sparsity.rewire import Redistribution
from dnr_deploy.sparsity.schedule import RewireSchedule

RUN_FORMAT = "dnr-deploy/run/1"


class Method(str, Enum):
    """How sparsity is reached; each is one policy plugged into the same training loop."""

    DNR = "dnr"  # Dynamic Network Rewiring (this project's method)
    STATIC = "static"  # random masks (single weights or channel units), never rewired
    MAGNITUDE = "magnitude"  # dense half, global magnitude prune, fine-tune half


class ConfigError(ValueError):
    """A compress configuration that cannot run (bad value, wrong device, clash on resume)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the last completed epoch's checkpoint is kept."""


@dataclass
class CompressConfig:
    """Every setting of a compress run; the only place their defaults are written.

    `eps`, `pgd_step_size` and `eval_pgd7_step_size` left as None take the dataset's threat
    model (digits: eps 0.2; CIFAR and Tiny-ImageNet: eps 8/255, step 2/255, PGD-7 step 0.01).
    """

    model: str = option(
        "small", 'architecture: small, resnet18, vgg16, torchvision:NAME or MODULE:FACTORY')
    dataset: str = option(
        "digits", 'dataset (digits is embedded; the others load from --data-dir)')
    data_dir: str | None = option(None, 'local folder holding the dataset (never downloaded)')
    granularity: str = option(
        Granularity.IRREGULAR.value, 'prune single weights or whole output channels')
    method: str = option(
        Method.DNR.value,
        'dnr (rewiring); static (random masks, never rewired); magnitude (dense half, '
        'global magnitude prune, fine-tune half): the baselines, in the same loop and '
        'epochs')
    density: float = option(0.05, 'fraction of weights kept, in (0, 1]; 0.05 is 20x compression')
    dense: bool = option(False, 'no pruning: plain PGD adversarial training (the baseline)')
    # DNR's rewiring schedule, in optimizer steps and fractions of training (sparsity/schedule.py)
    rewire_every: int = option(50, "optimizer steps between DNR's rewires")
    prune_rate: float = option(
        0.3, "fraction of each layer's active weights pruned at the first rewire (cosine to 0)")
    rewire_until: float = option(
        0.75, "fraction of training after which the topology is frozen")
    redistribution: str = option(
        Redistribution.MOMENTUM.value,
        "momentum: the freed budget goes where the hybrid loss's momentum is (DNR); none: each "
        "layer regrows what it pruned")
    init: str = option(Init.ERK.value, "first masks: erk (Evci et al. 2020) or uniform")
    explore_channels: bool = option(
        False, "channel regrowth skips the units it just pruned (random off units instead)")
    beta: float = option(0.5, 'weight of the clean loss; 1 - beta weighs the PGD loss')
    epochs: int = option(20, 'training epochs')
    batch_size: int = option(64, 'batch size')
    lr: float = option(0.1, 'initial SGD learning rate (cosine decay)')
    momentum: float = option(0.9, 'SGD momentum')
    weight_decay: float = option(5e-4, 'L2 penalty (SGD weight decay)')
    eps: float | None = option(None, "Linf radius in [0, 1] pixel units (default: the dataset's)")
    pgd_steps: int = option(7, 'PGD steps when crafting training attacks')
    pgd_step_size: float | None = option(
        None, "PGD step for training attacks (default: the dataset's)")
    eval_pgd7_step_size: float | None = option(
        None, 'step of the final PGD-7 evaluation (the paper uses 0.01)')
    attack_bn: str = option("eval", 'BatchNorm mode while crafting training attacks')
    eval_samples: int | None = option(1000, 'test images scored after each epoch')
    # first test images the final AutoAttack-grade ensemble scores (None: the dataset's choice,
    robust_eval_samples: int | None = option(
        None,
        'first test images the final AutoAttack-grade ensemble scores (default: all of '
        'digits, 1000 of the others)')
    seed: int = option(0, 'random seed (masks, init, data order, attacks)')
    device: str = option("cpu", 'where to train')
    out: str | None = option(None, 'run dir to create (default: runs/<time>-<model>-...)')
    resume: str | None = option(None, 'run dir or checkpoint to continue')
    stop_after: int | None = option(
        None, 'stop after this many epochs, leaving a resumable checkpoint')

    def resolved(self) -> CompressConfig:
        """A copy with dataset defaults filled in, after validating every field.

        Raises:
            ConfigError: a value out of range or unknown, with the allowed values.
        """
        try:
            spec = SPECS[parse_dataset(self.dataset)]
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            check_model_spec(self.model)
        except ModelSpecError as err:
            raise ConfigError(str(err)) from None
        if self.granularity not in [g.value for g in Granularity]:
            allowed = ", ".join(g.value for g in Granularity)
            raise ConfigError(f"unknown granularity {self.granularity!r}; available: {allowed}")
        if self.method not in [m.value for m in Method]:
            allowed = ", ".join(m.value for m in Method)
            raise ConfigError(f"unknown method {self.method!r}; available: {allowed}")
        if self.method == Method.MAGNITUDE.value and \
                self.granularity != Granularity.IRREGULAR.value:
            raise ConfigError("--method magnitude prunes single weights: use "
                              "--granularity irregular (or --method static for random channels)")
        if not (0.0 < self.density <= 1.0) or math.isnan(self.density):
            raise ConfigError(
                f"density must be in (0, 1] (the fraction of weights kept), got {self.density}"
            )
        try:
            RewireSchedule(self.rewire_every, self.prune_rate, self.rewire_until)
            Redistribution(self.redistribution)
            Init(self.init)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta}")
        for name in ("epochs", "batch_size", "pgd_steps", "eval_samples", "robust_eval_samples",
                     "stop_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not (0.0 < self.lr < math.inf):
            raise ConfigError(f"lr must be positive and finite, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        for name in ("pgd_step_size", "eval_pgd7_step_size"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1] (pixel units), got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.attack_bn not in ("eval", "train"):
            raise ConfigError(f"attack_bn must be 'eval' or 'train', got {self.attack_bn!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; available: cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to torch here")
        eps = spec.eps if self.eps is None else self.eps
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"eps must be in (0, 1] (pixel units), got {eps}")
        return dataclasses.replace(
            self,
            eps=eps,
            pgd_step_size=self.pgd_step_size or spec.pgd_step_size * eps / spec.eps,
            eval_pgd7_step_size=self.eval_pgd7_step_size or spec.eval_pgd7_step_size,
        )


def settings_from_checkpoint(saved: object, where: str) -> dict:
    """The CompressConfig fields a checkpoint's "config" records, each checked for its type.

    Raises:
        CheckpointError: not a mapping, or a value of the wrong type for its field (a damaged
            or foreign checkpoint).
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: its config is {type(saved).__name__}, not a mapping; "
                              "not a dnr-compress checkpoint")
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    try:
        return {name: coerce(CompressConfig, name, value, where)
                for name, value in saved.items() if name in known}
    except RecipeError as err:
        raise CheckpointError(str(err)) from None


def merge_resume(config: CompressConfig, saved: object, where: str) -> CompressConfig:
    """`config` for continuing a checkpoint whose recorded config is `saved`.

    A setting left at its default takes the checkpoint's value, so
    `compress(CompressConfig(resume=RUN))` continues RUN as it was trained; `out`,
    `resume` and `stop_after` belong to this invocation and are never taken from it. The
    CLI and the library both go through here.

    Raises:
        CheckpointError: `saved` is not a checkpoint's config.
    """
    settings = settings_from_checkpoint(saved, where)
    defaults = CompressConfig()
    merged = {
        name: settings[name]
        for name in settings
        if name not in ("out", "resume", "stop_after")
        and getattr(config, name) == getattr(defaults, name)
    }
    return dataclasses.replace(config, **merged)


# Fields that define what a checkpoint is; a resume must not change them.
RESUME_FIXED = ("model", "dataset", "granularity", "method", "density", "dense", "beta",
                "rewire_every", "prune_rate", "rewire_until", "redistribution", "init",
                "explore_channels",
                "batch_size", "lr", "momentum", "weight_decay", "eps", "pgd_steps",
                "pgd_step_size", "seed", "attack_bn")


@dataclass
class Run:
    """A finished (or stopped) run: its folder and what run.json records."""

    dir: Path
    summary: dict = field(default_factory=dict)


class HybridObjective:
    """`beta * CE(f(x), y) + (1 - beta) * CE(f(x_adv), y)` with x_adv from PGD.

    The attack is crafted with BN in `attack_bn` mode ("eval" by default: running statistics,
    the function that will be deployed, and no statistics updates from attack iterates).
    """

    def __init__(self, config: CompressConfig) -> None:
        self.config = config

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
        attack_model: nn.Module | None = None,
    ) -> dict:
        """Losses on (x, y). `attack_model` crafts x_adv when `model` is a DDP wrapper: the
        attack's extra forwards must not go through DDP's gradient hooks."""
        cfg = self.config
        if cfg.beta >= 1.0:  # clean training: no attack to pay for
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "loss_clean": loss, "loss_adv": torch.zeros(()), "logits": logits}
        attacker = model if attack_model is None else attack_model
        attacker.train(cfg.attack_bn == "train")
        x_adv = pgd(attacker, x, y, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, random_start=True)
        attacker.train()
        logits = model(x)
        loss_clean = F.cross_entropy(logits, y)
        loss_adv = F.cross_entropy(model(x_adv), y)
        loss = cfg.beta * loss_clean + (1.0 - cfg.beta) * loss_adv
        return {"loss": loss, "loss_clean": loss_clean, "loss_adv": loss_adv, "logits": logits}


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    objective: HybridObjective,
    policy: DensePolicy,
    device: torch.device,
    attack_model: nn.Module | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of every loss the objective reports.
    `after_step(batch_index)` runs after each optimizer step and mask re-application (the
    trainer rewires there when the schedule says so).

    Raises:
        TrainingDiverged: a loss that is NaN or infinite.
    """
    model.train()
    sums: dict[str, float] = {}
    batches = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        result = objective(model, x, y, attack_model)
        loss = result["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at batch {batches}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        policy.on_step_end(model if attack_model is None else attack_model)
        if after_step is not None:
            after_step(batches)
        for key, value in result.items():
            if key.startswith("loss"):
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        batches += 1
    return {key: total / max(batches, 1) for key, total in sums.items()}


def lr_at(epoch: int, epochs: int, base_lr: float) -> float:
    """Cosine learning rate for `epoch` (0-based): a pure function, so resume needs no state."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def build_model(config: CompressConfig, spec) -> nn.Module:
    """The run's network for dataset `spec`, checked to run at its image size.

    Raises:
        ConfigError: the model spec builds nothing, or nothing that runs at that size.
    """
    try:
        return create_model(config.model, spec.num_classes, spec.input_shape[0], spec.mean,
                            spec.std, input_shape=spec.input_shape)
    except ModelSpecError as err:
        raise ConfigError(str(err)) from None


def build_policy(
    config: CompressConfig, model: nn.Module, example_input: torch.Tensor
) -> DensePolicy:
    if config.dense:
        return DensePolicy()
    generator = torch.Generator().manual_seed(config.seed + 1)
    if config.granularity == Granularity.CHANNEL.value:
        channel_policy = StaticChannels if config.method == Method.STATIC.value else ChannelDNR
        try:
            return channel_policy(model, config.density, generator, example_input,
                                  config.explore_channels)
        except ChannelGraphError as err:
            raise ConfigError(f"model {config.model!r}: {err}") from None
    method = Method(config.method)
    if method is Method.DNR:
        return IrregularDNR(model, config.density, generator, config.init, config.redistribution)
    if method is Method.STATIC:
        return StaticSparse(model, config.density, generator, config.init)
    return MagnitudePrune(model, config.density, generator)


