"""The pieces of a compress run: its config, the hybrid objective, one training epoch, the
learning-rate schedule and the choice of sparsity policy. `trainer.py` drives them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dnr_deploy.attacks import pgd
from dnr_deploy.compress import distributed as ddp
from dnr_deploy.compress.checkpoint import CheckpointError

# the settings live in torch-free modules (fast --help); re-exported here, where they are used
from dnr_deploy.compress.config import CompressConfig, ConfigError, Method  # noqa: F401
from dnr_deploy.config import RecipeError, check_settings, coerce
from dnr_deploy.data import DataBundle
from dnr_deploy.models import ModelSpecError, create_model
from dnr_deploy.sparsity.groups import ChannelGraphError
from dnr_deploy.sparsity.masks import Granularity
from dnr_deploy.sparsity.policy import (
    ChannelBudgetError,
    ChannelDNR,
    DensePolicy,
    IrregularDNR,
    MagnitudePrune,
    StaticChannels,
    StaticSparse,
)
from dnr_deploy.vocabulary import ChannelShares, Loss

RUN_FORMAT = "dnr-deploy/run/1"

# Settings added after checkpoints were already written, with the behaviour those checkpoints
# were trained with: a default that changed with the new field must not change an old run.
BEFORE_FIELD_EXISTED = {"channel_shares": ChannelShares.SIZE.value,
                        "loss": Loss.HYBRID.value}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the last completed epoch's checkpoint is kept."""


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
        recorded = {name: coerce(CompressConfig, name, value, where)
                    for name, value in saved.items() if name in known}
    except RecipeError as err:
        raise CheckpointError(str(err)) from None
    settings = {**BEFORE_FIELD_EXISTED, **recorded}
    try:  # the rule every setting meets (finite, in range), named as the checkpoint's
        check_settings(CompressConfig(**settings), CheckpointError)
    except CheckpointError as err:
        raise CheckpointError(f"{where} is damaged: its {err}") from None
    return settings


def merge_resume(config: CompressConfig, saved: object, where: str) -> CompressConfig:
    """`config` for continuing a checkpoint whose recorded config is `saved`.

    A setting left at its default takes the checkpoint's value, so
    `compress(CompressConfig(resume=RUN))` continues RUN as it was trained; `out`, `resume`,
    `stop_after` and `trust_model_code` belong to this invocation and are never taken from it.
    The CLI and the library both go through here.

    Raises:
        CheckpointError: `saved` is not a checkpoint's config.
    """
    settings = settings_from_checkpoint(saved, where)
    defaults = CompressConfig()
    merged = {
        name: settings[name]
        for name in settings
        if name not in ("out", "resume", "stop_after", "trust_model_code")
        and getattr(config, name) == getattr(defaults, name)
    }
    return dataclasses.replace(config, **merged)


# Fields that define what a checkpoint is; a resume must not change them.
RESUME_FIXED = ("model", "dataset", "granularity", "method", "density", "dense", "beta",
                "loss", "trades_beta",
                "rewire_every", "prune_rate", "rewire_until", "redistribution", "init",
                "explore_channels", "channel_shares", "start_density",
                "batch_size", "lr", "momentum", "weight_decay", "eps", "pgd_steps",
                "pgd_step_size", "seed", "attack_bn", "image_size", "channels", "mean", "std")


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


class TradesObjective:
    """TRADES (Zhang et al. 2019): `CE(f(x), y) + trades_beta * KL(f(x_adv) || f(x))`, where
    x_adv maximizes that KL inside the eps ball by PGD from x + 0.001 * N(0, 1), with the
    training attack's steps and step size. Returned as {"loss", "loss_clean", "loss_adv"}
    (loss_adv is the KL term) so the loop and logs treat it like the hybrid loss.
    """

    def __init__(self, config: CompressConfig) -> None:
        self.config = config

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
        attack_model: nn.Module | None = None,
    ) -> dict:
        cfg = self.config
        attacker = model if attack_model is None else attack_model
        attacker.train(cfg.attack_bn == "train")
        with torch.no_grad():
            target = F.softmax(attacker(x), dim=1)
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp_(0.0, 1.0)
        for _ in range(cfg.pgd_steps):
            x_adv.requires_grad_(True)
            divergence = F.kl_div(F.log_softmax(attacker(x_adv), dim=1), target,
                                  reduction="sum")
            (grad,) = torch.autograd.grad(divergence, x_adv)
            with torch.no_grad():
                x_adv = x_adv + cfg.pgd_step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp_(0.0, 1.0)
        attacker.train()
        logits = model(x)
        loss_clean = F.cross_entropy(logits, y)
        loss_kl = F.kl_div(F.log_softmax(model(x_adv.detach()), dim=1),
                           F.softmax(logits, dim=1), reduction="batchmean")
        loss = loss_clean + cfg.trades_beta * loss_kl
        return {"loss": loss, "loss_clean": loss_clean, "loss_adv": loss_kl, "logits": logits}


def build_objective(config: CompressConfig) -> HybridObjective | TradesObjective:
    """The objective `config.loss` names."""
    return TradesObjective(config) if config.loss == Loss.TRADES.value else HybridObjective(config)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    objective: HybridObjective | TradesObjective,
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
    # a start at the target is the paper's sparse start: nothing to close in on
    start = None if config.start_density in (None, config.density) else config.start_density
    if config.granularity == Granularity.CHANNEL.value:
        channel_policy = StaticChannels if config.method == Method.STATIC.value else ChannelDNR
        try:
            return channel_policy(model, config.density, generator, example_input,
                                  config.explore_channels, start, config.channel_shares)
        except (ChannelGraphError, ChannelBudgetError) as err:
            raise ConfigError(f"model {config.model!r}: {err}") from None
    method = Method(config.method)
    if method is Method.DNR:
        return IrregularDNR(model, config.density, generator, config.init, config.redistribution,
                            start)
    if method is Method.STATIC:
        return StaticSparse(model, config.density, generator, config.init)
    return MagnitudePrune(model, config.density, generator)


def epoch_loader(bundle: DataBundle, config: CompressConfig,
                 context: ddp.DistContext) -> DataLoader:
    """Each rank reads its shard of every global batch. The order depends only on (seed,
    epoch), so a resumed run sees the same batches, and rank r's share of global batch i is
    the same images whatever the world size."""
    sampler = DistributedSampler(bundle.train, num_replicas=context.world_size,
                                 rank=context.rank, shuffle=True, seed=config.seed)
    return DataLoader(bundle.train, config.batch_size // context.world_size, sampler=sampler,
                      num_workers=config.workers, persistent_workers=config.workers > 0)
