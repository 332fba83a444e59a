"""The training loop: one run from scratch to a sparse, adversarially trained network (DNR).

Order of events per epoch (the loop owns it; objective and sparsity policy own the math):
train every batch on the hybrid loss, re-applying masks after each optimizer step; evaluate clean
and PGD accuracy on the test split; rewire every `rewire_every` steps; checkpoint atomically.
Under torchrun every rank trains; only rank 0 evaluates, writes files and shows progress.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dnr_deploy.attacks import pgd
from dnr_deploy.compress import byo, run_dirs
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress import distributed as ddp
from dnr_deploy.compress.evaluation import (
    evaluate,
    final_attacks,
    progress_silenced,
    robust_evaluation,
    terminal_progress,
)
from dnr_deploy.compress.init_weights import load_initial_weights
from dnr_deploy.compress.plots import deployment_figures, plot_run
from dnr_deploy.compress.training import (
    RUN_FORMAT,
    CompressConfig,
    ConfigError,
    Run,
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    build_objective,
    build_policy,
    epoch_loader,
    lr_at,
    merge_resume,
    train_one_epoch,
)
from dnr_deploy.data import DataBundle, load_data, test_subset
from dnr_deploy.sparsity.masks import DENSE
from dnr_deploy.sparsity.policy import DensePolicy
from dnr_deploy.sparsity.schedule import RewireSchedule


def compress(config: CompressConfig, model: nn.Module | None = None,
             train_data: object = None, test_data: object = None) -> Run:
    """Train one DNR run as `config` says and write its run dir. The CLI does exactly this.

    Its memory is freed when it returns, for an export or a second run in the same process.
    Frames of the first SGD construction (a lazy import inside torch) and of matplotlib's
    tight_layout stay referenced from a reference cycle, and through their callers' frames the
    trainer, model, gradients and momentum do too, until the cyclic collector runs (tensor
    bytes never trigger it). Found with gc.get_referrers; measured on regnet_y_16gf in channel
    mode: collecting frees 1.4x the model's size before the export. regnet_y_128gf (2.55 GB of
    weights) was killed at 23.6 GB after its channel training without this collection and the
    torchvision sweep's before a retry; it passed with both.

    Args:
        model: an nn.Module trained (in place) instead of one built from `config.model`.
        train_data, test_data: Datasets or DataLoaders in place of `config.dataset`'s splits.
            byo.py says what they must hold and what the run records of them.

    Raises:
        ConfigError, DataError, CheckpointError, RecipeError: bad input; nothing is written.
        TrainingDiverged, TrainingInterrupted: the run stopped; its last checkpoint is kept.
        RankDisagreement: under torchrun, ranks ended a rewire with different masks.
    """
    run = _compress(config, model, train_data, test_data)
    gc.collect()
    return run


def _compress(config: CompressConfig, model: nn.Module | None, train_data: object,
              test_data: object) -> Run:
    resume_state = ckpt.load_checkpoint(config.resume) if config.resume else None
    where = f"checkpoint {str(config.resume)!r}"
    if resume_state is not None:
        run_dirs.check_resumed_model_trusted(config, resume_state["config"], where)
        config = merge_resume(config, resume_state["config"], where)
    config = byo.resolve_config(config, model)
    if resume_state is not None:
        run_dirs.check_resume(config, resume_state["config"], where)
    bundle = byo.with_data(config, train_data, test_data, load_data)
    module = None if model is None else byo.training_model(model, config, bundle.spec)
    context = ddp.init_distributed(config.device)
    try:
        byo.check_distributed(context, train_data, test_data)
        run_dir = run_dirs.agree_on_run_dir(context, config)
        trainer = Trainer.create(config, bundle, context, resume_state, module)
        if context.is_main and config.resume:  # a run killed mid-write left its temp file
            ckpt.remove_stale_temps(run_dir)
        return trainer.run(run_dir)
    finally:
        ddp.shutdown(context)


# Keys of a metrics row (metrics.jsonl) that the loop, the run summary and the plots read.
HISTORY_KEYS = ("epoch", "loss", "clean_acc", "pgd_acc", "density", "train_seconds",
                "rewire_seconds")


@dataclass
class Trainer:
    """The live objects of one run (on one rank); `run` drives the epochs."""

    config: CompressConfig
    bundle: DataBundle
    context: ddp.DistContext
    device: torch.device
    model: nn.Module  # the plain model: masks, evaluation and checkpoints use its names
    train_model: nn.Module  # what the optimizer steps through: DDP-wrapped under torchrun
    optimizer: torch.optim.SGD
    policy: DensePolicy
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    saved_epoch: int | None = None  # the epoch of the checkpoint on disk (None: none yet)
    init_from: dict | None = None  # what --init-from loaded (init_weights.py)

    @classmethod
    def create(cls, config, bundle, context, resume_state, module=None) -> Trainer:
        if config.batch_size % context.world_size:
            raise ConfigError(f"batch size {config.batch_size} does not split evenly across "
                              f"{context.world_size} ranks")
        device = context.device(config.device)
        # Same seed on every rank: identical initial weights and masks. Attack noise and other
        # per-rank randomness then draw from seed + rank below.
        torch.manual_seed(config.seed)
        spec = bundle.spec
        steps = config.epochs * len(epoch_loader(bundle, config, context))
        config = config.with_start_density(config.rewire_schedule().rewires(steps))
        model = (build_model(config, spec) if module is None else module).to(device)
        init_from = None if not config.init_from or resume_state else \
            load_initial_weights(model, config.init_from, quiet=not context.is_main)
        policy = build_policy(config, model, torch.zeros(1, *spec.input_shape, device=device))
        torch.manual_seed(config.seed + context.rank)
        train_model = model
        if context.enabled:
            ids = [device.index] if device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        trainer = cls(config, bundle, context, device, model, train_model, optimizer, policy,
                      init_from=init_from)
        if resume_state is not None:
            trainer.load(resume_state)
        return trainer

    def loader(self) -> DataLoader:
        return epoch_loader(self.bundle, self.config, self.context)

    def state(self, epoch: int) -> dict:
        rng = {"torch_per_rank": ddp.gather_objects(self.context, torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda_per_rank"] = ddp.gather_objects(
                self.context, torch.cuda.get_rng_state(self.device))
        return {
            "epoch": epoch, "config": asdict(self.config), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "rng": rng, "world_size": self.context.world_size, "history": self.history,
        }

    def load(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.policy.load_state_dict(state["policy"])
            self.start_epoch = self.saved_epoch = int(state["epoch"])
            self.history = list(state["history"])
            rng = state["rng"]
            if int(state.get("world_size", 1)) == self.context.world_size:
                torch.set_rng_state(rng["torch_per_rank"][self.context.rank])
                if self.device.type == "cuda" and "cuda_per_rank" in rng:
                    torch.cuda.set_rng_state(rng["cuda_per_rank"][self.context.rank], self.device)
            else:  # a different world size cannot continue the same streams: a fresh, seeded one
                torch.manual_seed(self.config.seed + 1000 * self.start_epoch + self.context.rank)
            self._check_resumed()
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise ckpt.CheckpointError(f"checkpoint does not fit this run: {reason}") from None

    def _check_resumed(self) -> None:
        """What the load_state_dict calls leave unchecked, checked before any training: a
        damaged checkpoint must fail now, not epochs later (mask and momentum shapes, the
        optimizer's settings, one metrics row per finished epoch).

        Raises:
            ValueError: naming the first damaged entry.
        """
        params = dict(self.model.named_parameters())
        for name, mask in getattr(self.policy, "masks", {}).items():
            weight = params.get(name)
            if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                    or weight is None or mask.shape != weight.shape):
                raise ValueError(f"mask {name!r} is not a bool tensor shaped like its weight")
        for group in self.optimizer.param_groups:
            for key in ("lr", "momentum", "weight_decay", "dampening"):
                if not ckpt.is_number(group.get(key)):  # finite: NaN momentum trains NaN
                    raise ValueError(f"optimizer setting {key!r} is {group.get(key)!r}")
            for param in group["params"]:
                buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None and (not isinstance(buffer, torch.Tensor)
                                           or buffer.shape != param.shape):
                    raise ValueError("an optimizer momentum buffer does not fit its parameter")
        if len(self.history) != self.start_epoch:
            raise ValueError(f"it records epoch {self.start_epoch} but metrics for "
                             f"{len(self.history)} epochs")
        for row in self.history:
            numbers = [row.get(key) for key in HISTORY_KEYS] if isinstance(row, dict) else [None]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
                raise ValueError(f"a metrics row is damaged: {str(row)[:80]}")
            json.dumps(row)  # metrics.jsonl is rewritten from these rows after every epoch

    def save(self, run_dir: Path, epoch: int) -> None:
        """Raises CheckpointError when a write fails (a full disk): the last good one stays."""
        state = self.state(epoch)  # a collective under torchrun: every rank takes part
        if self.context.is_main:
            try:
                ckpt.save_checkpoint(run_dir, state)
                self.saved_epoch = epoch
                # The checkpoint is the record; metrics.jsonl is a view of its history,
                # rewritten whole, so a kill between the two writes is mended by the next resume.
                ckpt.write_jsonl(run_dir / ckpt.METRICS_JSONL, self.history)
            except (ckpt.CheckpointError, OSError) as err:
                raise ckpt.write_failed(err, run_dir, self.saved_epoch) from None

    def run(self, run_dir: Path) -> Run:
        cfg = self.config
        if self.start_epoch == 0 and not self.history:
            self.save(run_dir, 0)
        if self.context.is_main:  # only now: LATEST never names a run without a checkpoint
            ckpt.remember_latest(run_dir)
        end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        epoch = self.start_epoch
        loader = self.loader()
        # Counted in training images, moved every optimizer step: images/s and an ETA that
        # mean something even when an epoch takes minutes.
        bar = tqdm(total=cfg.epochs * len(loader.dataset), unit="img", unit_scale=True,
                   initial=self.start_epoch * len(loader.dataset), dynamic_ncols=True,
                   disable=not self.context.is_main or progress_silenced())
        self._progress = bar
        try:
            for epoch in range(self.start_epoch, end):
                bar.set_description(f"{cfg.method} {self.policy.granularity} epoch "
                                    f"{epoch + 1}/{cfg.epochs}")
                loader.sampler.set_epoch(epoch)
                row = self._one_epoch(epoch, loader)
                self.history.append(row)
                self.save(run_dir, epoch + 1)
                bar.n = (epoch + 1) * len(loader.dataset)  # the steps' rounding, corrected
                bar.set_postfix({"loss": f"{row['loss']:.3f}",
                                 "test clean": f"{row['clean_acc']:.3f}",
                                 f"test PGD-{cfg.pgd_steps}": f"{row['pgd_acc']:.3f}",
                                 "density": f"{row['density']:.4f}"})
        except (KeyboardInterrupt, ddp.JobTerminated) as err:
            cause = "interrupted" if isinstance(err, KeyboardInterrupt) else (
                f"rank {self.context.rank} stopped by {err} (under torchrun: another rank failed)")
            raise TrainingInterrupted(
                f"{cause} in epoch {epoch + 1}; the checkpoint of epoch {epoch} is kept in "
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
        try:
            return Run(run_dir, self._finish(run_dir) if self.context.is_main else {})
        except OSError as err:  # run.json or a plot on a full disk: resuming redoes the end
            raise ckpt.write_failed(err, run_dir, self.saved_epoch) from None

    def _one_epoch(self, epoch: int, loader: DataLoader) -> dict:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg.epochs, cfg.lr)
        started = time.perf_counter()
        attack_model = self.model if self.context.enabled else None
        rewires: list[dict] = []

        def after_step(batch: int) -> None:
            self._progress.update(len(loader.dataset) // len(loader))
            rewires.extend(self._rewire_if_due(epoch * len(loader) + batch + 1,
                                               cfg.epochs * len(loader)))

        losses = train_one_epoch(self.train_model, loader, self.optimizer, build_objective(cfg),
                                 self.policy, self.device, attack_model, after_step)
        losses = ddp.mean_across_ranks(self.context, losses, self.device)
        rewire_seconds = sum(r.pop("seconds") for r in rewires)
        train_seconds = time.perf_counter() - started - rewire_seconds
        accuracy = {"clean": float("nan"), "pgd": float("nan")}
        if self.context.is_main:
            x_eval, y_eval = test_subset(self.bundle, cfg.eval_samples)
            attack = {"pgd": lambda m, x, y, _i: pgd(m, x, y, cfg.eps, cfg.pgd_step_size,
                                                     cfg.pgd_steps)}
            accuracy = evaluate(self.model, x_eval, y_eval, attack, self.device)
        extra: dict = {}
        if epoch < cfg.epochs - 1:  # magnitude pruning's one step: never after the last epoch
            extra = self.policy.on_epoch_end(self.model, self.optimizer, epoch, cfg.epochs)
            self._check_ranks_agree(f"the end of epoch {epoch + 1}")
        return {"epoch": epoch + 1, **losses, "clean_acc": accuracy["clean"],
                "pgd_acc": accuracy["pgd"], "density": self.policy.density(),
                "lr": lr_at(epoch, cfg.epochs, cfg.lr), "train_seconds": train_seconds,
                "rewire_seconds": rewire_seconds, **extra, "rewires": rewires,
                "layer_densities": self.policy.layer_densities()}

    @cached_property
    def schedule(self) -> RewireSchedule:
        """When the policy rewires: a pure function of the optimizer step (built once)."""
        return self.config.rewire_schedule()

    def _rewire_if_due(self, step: int, total_steps: int) -> list[dict]:
        """The rewire after optimizer step `step`, if the schedule has one: [its record]."""
        fraction = self.schedule.rate_at(step, total_steps)
        if fraction is None:
            return []
        started = time.perf_counter()
        record = self.policy.rewire(self.model, self.optimizer, fraction,
                                    self.schedule.progress(step, total_steps))
        if not record:
            return []
        self._check_ranks_agree(f"the rewire after step {step}")
        return [{"step": step, **record, "seconds": time.perf_counter() - started}]

    def _check_ranks_agree(self, when: str) -> None:
        """Under torchrun, every rank must hold the same masks and weights after a rewire."""
        ddp.check_agreement(self.context, getattr(self.policy, "masks", {}), f"masks after {when}")
        # Parameters, not buffers: BN running statistics differ per shard until DDP
        # broadcasts rank 0's at the next forward.
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        ddp.check_agreement(self.context, params, f"weights after {when}")

    def _finish(self, run_dir: Path) -> dict:
        cfg, spec = self.config, self.bundle.spec
        x_test, y_test = test_subset(self.bundle, None)
        accuracy = evaluate(self.model, x_test, y_test,
                            final_attacks(cfg.eps, cfg.eval_pgd7_step_size), self.device)
        x_robust, y_robust = test_subset(self.bundle, cfg.robust_eval_samples
                                         or spec.robust_eval_images)
        robustness = robust_evaluation(self.model, x_robust, y_robust, cfg.eps, self.device,
                                       progress=terminal_progress("final evaluation, "))
        accuracy["autoattack"] = robustness["robust"]
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
            "class_names": list(spec.class_names),
            **({"dataset": self.bundle.record} if self.bundle.record else {}),
            **({"init_from": self.init_from} if self.init_from else {}),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "granularity": self.policy.granularity,
            "method": DENSE if cfg.dense else cfg.method,
            "density": {"target": 1.0 if cfg.dense else cfg.density,
                        "achieved": self.policy.density()},
            "layer_densities": self.policy.layer_densities(),
            **deployment_figures(self.model, self.policy, example),
            "threat_model": {"norm": "Linf", "eps": cfg.eps},
            "accuracy": accuracy,
            "robustness": robustness,
            "timing": {"epochs": len(self.history), "world_size": self.context.world_size,
                       "train_seconds_per_epoch": sum(train_seconds) / len(train_seconds),
                       "rewire_seconds_total": sum(r["rewire_seconds"] for r in self.history)},
            **({"api_data": list(self.bundle.from_api)} if self.bundle.from_api else {}),
            "checkpoint_sha256": ckpt.sha256_of(run_dir / ckpt.CHECKPOINT_NAME),
            "versions": {"torch": torch.__version__},
        }
        ckpt.write_json(run_dir / ckpt.RUN_JSON, summary)
        plot_run(run_dir / "plots", self.model, self.history, summary["layer_densities"],
                 cfg.density)
        return summary
