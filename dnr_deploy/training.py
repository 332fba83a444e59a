"""The training loop: one run from scratch to a sparse, adversarially trained network (DNR).

Order of events per epoch (the loop owns it; objective and sparsity policy own the math):
train every batch on the hybrid loss, re-applying masks after each optimizer step; evaluate clean
and PGD accuracy on the test split; rewire (every epoch but the last); checkpoint atomically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dnr_deploy import checkpoint as ckpt
from dnr_deploy.attacks import pgd
from dnr_deploy.data import SPECS, DataBundle, load_data, make_loader, parse_dataset, test_subset
from dnr_deploy.evaluation import evaluate, final_attacks
from dnr_deploy.models import create_model, list_models
from dnr_deploy.report import deployment_figures, plot_layer_densities, plot_training
from dnr_deploy.sparsity.masks import Granularity
from dnr_deploy.sparsity.policy import (
    ChannelDNR,
    DensePolicy,
    IrregularDNR,
    MagnitudePrune,
    StaticSparse,
)

RUN_FORMAT = "dnr-deploy/run/1"


class Method(str, Enum):
    """How sparsity is reached; each is one policy plugged into the same training loop."""

    DNR = "dnr"  # Dynamic Network Rewiring (this project's method)
    STATIC = "static"  # random masks, never rewired
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

    model: str = "small"
    dataset: str = "digits"
    data_dir: str | None = None
    granularity: str = Granularity.IRREGULAR.value
    method: str = Method.DNR.value
    density: float = 0.05
    dense: bool = False  # no pruning: plain PGD adversarial training, the baseline
    beta: float = 0.5  # weight of the clean loss; 1 - beta goes to the adversarial loss
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float | None = None
    pgd_steps: int = 7
    pgd_step_size: float | None = None
    eval_pgd7_step_size: float | None = None
    attack_bn: str = "eval"  # BN mode while crafting training attacks: "eval" or "train"
    eval_samples: int | None = 1000  # test images scored after every epoch (None: all)
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    resume: str | None = None
    stop_after: int | None = None  # end this invocation after that many epochs, resumable

    def resolved(self) -> CompressConfig:
        """A copy with dataset defaults filled in, after validating every field.

        Raises:
            ConfigError: a value out of range or unknown, with the allowed values.
        """
        try:
            spec = SPECS[parse_dataset(self.dataset)]
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.model not in list_models():
            models = ", ".join(list_models())
            raise ConfigError(f"unknown model {self.model!r}; available: {models}")
        if self.granularity not in [g.value for g in Granularity]:
            allowed = ", ".join(g.value for g in Granularity)
            raise ConfigError(f"unknown granularity {self.granularity!r}; available: {allowed}")
        if self.method not in [m.value for m in Method]:
            allowed = ", ".join(m.value for m in Method)
            raise ConfigError(f"unknown method {self.method!r}; available: {allowed}")
        if self.method != Method.DNR.value and self.granularity != Granularity.IRREGULAR.value:
            raise ConfigError(f"--method {self.method} prunes single weights: use "
                              "--granularity irregular (channel pruning is DNR's)")
        if not (0.0 < self.density <= 1.0) or math.isnan(self.density):
            raise ConfigError(
                f"density must be in (0, 1] (the fraction of weights kept), got {self.density}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta}")
        for name in ("epochs", "batch_size", "pgd_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
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


# Fields that define what a checkpoint is; a resume must not change them.
RESUME_FIXED = ("model", "dataset", "granularity", "method", "density", "dense", "beta",
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

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        cfg = self.config
        if cfg.beta >= 1.0:  # clean training: no attack to pay for
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "loss_clean": loss, "loss_adv": torch.zeros(()), "logits": logits}
        model.train(cfg.attack_bn == "train")
        x_adv = pgd(model, x, y, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, random_start=True)
        model.train()
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
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of every loss the objective reports.

    Raises:
        TrainingDiverged: a loss that is NaN or infinite.
    """
    model.train()
    sums: dict[str, float] = {}
    batches = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        result = objective(model, x, y)
        loss = result["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at batch {batches}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        policy.on_step_end(model)
        for key, value in result.items():
            if key.startswith("loss"):
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        batches += 1
    return {key: total / max(batches, 1) for key, total in sums.items()}


def lr_at(epoch: int, epochs: int, base_lr: float) -> float:
    """Cosine learning rate for `epoch` (0-based): a pure function, so resume needs no state."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def build_policy(
    config: CompressConfig, model: nn.Module, example_input: torch.Tensor
) -> DensePolicy:
    if config.dense:
        return DensePolicy()
    generator = torch.Generator().manual_seed(config.seed + 1)
    if config.granularity == Granularity.CHANNEL.value:
        return ChannelDNR(model, config.density, generator, example_input)
    policies = {Method.DNR: IrregularDNR, Method.STATIC: StaticSparse,
                Method.MAGNITUDE: MagnitudePrune}
    return policies[Method(config.method)](model, config.density, generator)


def compress(config: CompressConfig) -> Run:
    """Train one DNR run as `config` says and write its run dir. The CLI does exactly this.

    Raises:
        ConfigError, DataError, CheckpointError: bad input; nothing is written.
        TrainingDiverged, TrainingInterrupted: the run stopped; its last checkpoint is kept.
    """
    resume_state = ckpt.load_checkpoint(config.resume) if config.resume else None
    config = config.resolved()
    if resume_state is not None:
        _check_resume(config, resume_state["config"])
    bundle = load_data(config.dataset, config.data_dir)
    run_dir = _run_dir(config)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    session = _Session.create(config, bundle, device, resume_state)
    ckpt.remember_latest(run_dir)
    return session.run(run_dir)


def _check_resume(config: CompressConfig, saved: dict) -> None:
    saved_resolved = CompressConfig(**{
        k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(CompressConfig)}
    }).resolved()
    for name in RESUME_FIXED:
        saved_value, value = getattr(saved_resolved, name), getattr(config, name)
        if saved_value != value:
            raise ConfigError(
                f"--resume: the checkpoint was trained with {name}={saved_value!r}, "
                f"not {value!r}; drop that setting to continue it"
            )


def _run_dir(config: CompressConfig) -> Path:
    if config.resume:
        return ckpt.resolve_checkpoint(config.resume).parent
    if config.out:
        out = Path(config.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                f"--out {str(out)!r} exists and is not empty; use --resume to continue it"
            )
        return out
    kind = "dense" if config.dense else config.granularity
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.model}-{config.dataset}-{kind}-d{config.density:g}-s{config.seed}"
    return Path("runs") / name


@dataclass
class _Session:
    """The live objects of one run; `run` drives the epochs."""

    config: CompressConfig
    bundle: DataBundle
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.SGD
    policy: DensePolicy
    loader_generator: torch.Generator
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, config, bundle, device, resume_state) -> _Session:
        spec = bundle.spec
        model = create_model(
            config.model, spec.num_classes, spec.input_shape[0], spec.mean, spec.std
        ).to(device)
        example = torch.zeros(1, *spec.input_shape, device=device)
        policy = build_policy(config, model, example)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        session = cls(config, bundle, device, model, optimizer, policy,
                      torch.Generator().manual_seed(config.seed))
        if resume_state is not None:
            session.load(resume_state)
        return session

    def state(self, epoch: int) -> dict:
        rng = {"torch": torch.get_rng_state(), "loader": self.loader_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "epoch": epoch, "config": asdict(self.config), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "rng": rng, "history": self.history,
        }

    def load(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.policy.load_state_dict(state["policy"])
            torch.set_rng_state(state["rng"]["torch"])
            self.loader_generator.set_state(state["rng"]["loader"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            self.start_epoch = int(state["epoch"])
            self.history = list(state["history"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise ckpt.CheckpointError(f"checkpoint does not fit this run: {err}") from None

    def run(self, run_dir: Path) -> Run:
        cfg = self.config
        if self.start_epoch == 0 and not self.history:
            ckpt.save_checkpoint(run_dir, self.state(0))
        x_eval, y_eval = test_subset(self.bundle, cfg.eval_samples)
        pgd_eval = {"pgd": lambda m, x, y: pgd(m, x, y, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps)}
        loader = make_loader(self.bundle.train, cfg.batch_size, True, self.loader_generator)
        objective = HybridObjective(cfg)
        end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        bar = tqdm(range(self.start_epoch, end), initial=self.start_epoch, total=cfg.epochs,
                   desc=f"dnr {self.policy.granularity}", unit="epoch", dynamic_ncols=True)
        epoch = self.start_epoch
        try:
            for epoch in bar:
                row = self._one_epoch(epoch, loader, objective, x_eval, y_eval, pgd_eval)
                self.history.append(row)
                ckpt.save_checkpoint(run_dir, self.state(epoch + 1))
                ckpt.write_jsonl(run_dir / ckpt.METRICS_JSONL, self.history)
                bar.set_postfix(loss=f"{row['loss']:.3f}", clean=f"{row['clean_acc']:.3f}",
                                pgd=f"{row['pgd_acc']:.3f}", density=f"{row['density']:.4f}")
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}; the checkpoint of epoch {epoch} is kept in "
                f"{run_dir} (continue with --resume {run_dir})"
            ) from None
        except TrainingDiverged as err:
            raise TrainingDiverged(
                f"{err} in epoch {epoch + 1}; the checkpoint of epoch {epoch} is kept in {run_dir}"
                " (lower --lr or check the data)"
            ) from None
        finally:
            bar.close()
        if end < cfg.epochs:
            return Run(run_dir, {"stopped_after_epoch": end})
        summary = self._finish(run_dir)
        return Run(run_dir, summary)

    def _one_epoch(self, epoch, loader, objective, x_eval, y_eval, attacks) -> dict:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg.epochs, cfg.lr)
        started = time.perf_counter()
        losses = train_one_epoch(self.model, loader, self.optimizer, objective, self.policy,
                                 self.device)
        train_seconds = time.perf_counter() - started
        accuracy = evaluate(self.model, x_eval, y_eval, attacks, self.device)
        rewire: dict[str, float] = {}
        started = time.perf_counter()
        if epoch < cfg.epochs - 1:  # never rewire after the last epoch: nothing would train it
            rewire = self.policy.on_epoch_end(self.model, self.optimizer, epoch, cfg.epochs)
        rewire_seconds = time.perf_counter() - started
        return {"epoch": epoch + 1, **losses, "clean_acc": accuracy["clean"],
                "pgd_acc": accuracy["pgd"], "density": self.policy.density(),
                "lr": lr_at(epoch, cfg.epochs, cfg.lr), "train_seconds": train_seconds,
                "rewire_seconds": rewire_seconds, **rewire,
                "layer_densities": self.policy.layer_densities()}

    def _finish(self, run_dir: Path) -> dict:
        cfg, spec = self.config, self.bundle.spec
        x_test, y_test = test_subset(self.bundle, None)
        accuracy = evaluate(self.model, x_test, y_test,
                            final_attacks(cfg.eps, cfg.eval_pgd7_step_size), self.device)
        example = torch.zeros(1, *spec.input_shape, device=self.device)
        train_seconds = [row["train_seconds"] for row in self.history]
        summary = {
            "format": RUN_FORMAT,
            "config": asdict(cfg),
            "model": {"name": cfg.model, "num_classes": spec.num_classes,
                      "in_chans": spec.input_shape[0]},
            "input_shape": list(spec.input_shape),
            "input_range": [0.0, 1.0],
            "num_classes": spec.num_classes,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "granularity": self.policy.granularity,
            "method": "dense" if cfg.dense else cfg.method,
            "density": {"target": 1.0 if cfg.dense else cfg.density,
                        "achieved": self.policy.density()},
            "layer_densities": self.policy.layer_densities(),
            **deployment_figures(self.model, self.policy, example),
            "threat_model": {"norm": "Linf", "eps": cfg.eps},
            "accuracy": accuracy,
            "timing": {"epochs": len(self.history),
                       "train_seconds_per_epoch": sum(train_seconds) / len(train_seconds),
                       "rewire_seconds_total": sum(r["rewire_seconds"] for r in self.history)},
            "checkpoint_sha256": ckpt.sha256_of(run_dir / ckpt.CHECKPOINT_NAME),
            "versions": {"torch": torch.__version__},
        }
        ckpt.write_json(run_dir / ckpt.RUN_JSON, summary)
        plots = run_dir / "plots"
        plot_training(plots / "training.png", self.history)
        if summary["layer_densities"]:
            plot_layer_densities(plots / "layer_densities.png", summary["layer_densities"],
                                 cfg.density)
        return summary
