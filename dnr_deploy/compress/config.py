"""Every setting of a compress run (CompressConfig) and its validation, in a module that
imports no torch: `dnr-compress --help` builds its parser from these fields at once. The checks
that need torch or the dataset tables import them when a config is resolved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dnr_deploy.config import check_settings, option
from dnr_deploy.sparsity.schedule import RewireSchedule  # torch-free, as this module must be
from dnr_deploy.vocabulary import (
    ChannelShares,
    Granularity,
    Init,
    Loss,
    Method,
    Redistribution,
)

__all__ = ["CompressConfig", "ConfigError", "Method"]


# --rewire-until's defaults, measured best on the digits (docs/results.md): channel DNR from its
# sparse start settles its widths early, and rewiring on after that costs robustness
REWIRE_UNTIL = {Granularity.IRREGULAR.value: 0.75, Granularity.CHANNEL.value: 0.35}


class ConfigError(ValueError):
    """A compress configuration that cannot run (bad value, wrong device, clash on resume)."""



@dataclass
class CompressConfig:
    """Every setting of a compress run; the only place their defaults are written.

    `eps`, `pgd_step_size` and `eval_pgd7_step_size` left as None take the dataset's threat
    model (digits: eps 0.2; CIFAR and Tiny-ImageNet: eps 8/255, step 2/255, PGD-7 step 0.01).
    """

    model: str = option(
        "small", "architecture: small (small:K widens it K-fold), resnet18, vgg16, "
        "torchvision:NAME or MODULE:FACTORY")
    dataset: str = option(
        "digits", 'dataset (digits is embedded; the others load from --data-dir)')
    data_dir: str | None = option(None, 'local folder holding the dataset (never downloaded)')
    # --dataset folder: your own images (image_folder.py)
    image_size: str | None = option(
        None, 'folder: resize every image to H or HxW (default: their own size, all equal)')
    channels: int | None = option(
        None, 'folder: 1 or 3 (default: 1 if every image is greyscale, else 3)', "[1, 3]")
    mean: str | None = option(
        None, 'folder: per-channel mean, comma-separated (default: measured on train/)')
    std: str | None = option(
        None, 'folder: per-channel std, comma-separated (default: measured on train/)')
    skip_bad_images: bool = option(
        False, 'folder: skip unreadable or non-image files (and say how many) instead of '
        'stopping at the first')
    workers: int = option(
        0, 'DataLoader worker processes (0: load in the training process)', "[0, 256]")
    init_from: str | None = option(
        None, 'start from these weights: safetensors, or a torch state_dict (read with '
        'weights_only=True); tensors matched by name and shape')
    granularity: str = option(
        Granularity.IRREGULAR.value, 'prune single weights or whole output channels')
    method: str = option(
        Method.DNR.value,
        'dnr (rewiring); static (random masks, never rewired); magnitude (dense half, '
        'global magnitude prune, fine-tune half): the baselines, in the same loop and '
        'epochs')
    density: float = option(0.05, 'fraction of weights kept; 0.05 is 20x compression', '(0, 1]')
    dense: bool = option(False, 'no pruning: plain PGD adversarial training (the baseline)')
    # DNR's rewiring schedule, in optimizer steps and fractions of training (sparsity/schedule.py)
    rewire_every: int = option(50, "optimizer steps between DNR's rewires", ">= 1")
    prune_rate: float = option(
        0.3, "fraction of each layer's active weights pruned at the first rewire (cosine to 0)",
        "(0, 1)")
    rewire_until: float | None = option(
        None, "fraction of training after which the topology is frozen (default: 0.75 for "
        "irregular, 0.35 for channel mode, each measured best on the digits)", "[0, 1]")
    redistribution: str = option(
        Redistribution.MOMENTUM.value,
        "momentum: the freed budget goes where the hybrid loss's momentum is (DNR); none: each "
        "layer regrows what it pruned")
    init: str = option(Init.ERK.value, "first masks: erk (Evci et al. 2020) or uniform")
    start_density: float | None = option(
        None, "DNR: start at this density and close in on --density along a cubic over the "
        "rewires, each first cutting the smallest weights globally (channel mode: the same top "
        "fraction of units in every group by importance), then pruning and regrowing as usual "
        "(gradual pruning with regrowth: Zhu & Gupta 2017, GraNet, Liu et al. 2021); equal to "
        "--density: start sparse, as the DNR paper does; default: 1.0 (dense) for irregular DNR "
        "when the run has a rewire, else --density", "(0, 1]")
    channel_shares: str = option(
        ChannelShares.COST.value,
        "channel mode's split of the freed budget: each group's normalized momentum times "
        "cost (the parameters its active units take in the shrunk network) or size (its dense "
        "rows: the default before it was measured behind static random channels)")
    explore_channels: bool = option(
        False, "channel regrowth skips the units it just pruned (random off units instead)")
    beta: float = option(0.5, 'weight of the clean loss; 1 - beta weighs the PGD loss', '[0, 1]')
    loss: str = option(
        Loss.HYBRID.value,
        "training objective: hybrid (the DNR paper's beta-weighted clean + PGD cross-entropy) "
        "or trades (clean cross-entropy + --trades-beta times the KL divergence to an "
        "attack that maximizes it; Zhang et al. 2019, as HYDRA prunes with)")
    trades_beta: float = option(
        6.0, "TRADES: weight of the robustness (KL) term; the paper's CIFAR choice is 6",
        '[0, 1000]')
    epochs: int = option(20, 'training epochs', '>= 1')
    batch_size: int = option(64, 'batch size', '>= 1')
    lr: float = option(0.1, 'initial SGD learning rate (cosine decay)', '> 0')
    momentum: float = option(0.9, 'SGD momentum', '[0, 1)')
    weight_decay: float = option(5e-4, 'L2 penalty (SGD weight decay)', '>= 0')
    eps: float | None = option(None, "Linf radius in pixel units (default: the dataset's)",
                               '(0, 1]')
    pgd_steps: int = option(7, 'PGD steps when crafting training attacks', '>= 1')
    pgd_step_size: float | None = option(
        None, "PGD step for training attacks in pixel units (default: the dataset's)", '(0, 1]')
    eval_pgd7_step_size: float | None = option(
        None, 'step of the final PGD-7 evaluation (the paper uses 0.01)', '(0, 1]')
    attack_bn: str = option("eval", 'BatchNorm mode while crafting training attacks')
    eval_samples: int | None = option(1000, 'test images scored after each epoch', '>= 1')
    # first test images the final AutoAttack-grade ensemble scores (None: the dataset's choice,
    robust_eval_samples: int | None = option(
        None,
        'first test images the final AutoAttack-grade ensemble scores (default: all of '
        'digits, 1000 of the others)', '>= 1')
    seed: int = option(0, 'random seed (masks, init, data order, attacks)', '[0, 2**63)')
    device: str = option("cpu", 'where to train')
    out: str | None = option(None, 'run dir to create (default: runs/<time>-<model>-...)')
    resume: str | None = option(None, 'run dir or checkpoint to continue')
    stop_after: int | None = option(
        None, 'stop after this many epochs, leaving a resumable checkpoint', '>= 1')
    trust_model_code: bool = option(
        False, "--resume: import whatever MODULE:FACTORY the checkpoint names (runs its code); "
        "without it, name that spec with --model")

    def resolved(self) -> CompressConfig:
        """A copy with dataset defaults filled in, after validating every field.

        Raises:
            ConfigError: a value out of range or unknown, with the allowed values.
        """
        check_settings(self, ConfigError)  # finite and in range: every numeric field
        import torch

        from dnr_deploy.data import parse_dataset, threat_spec
        from dnr_deploy.models import ModelSpecError, check_model_spec

        try:
            spec = threat_spec(parse_dataset(self.dataset))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._check_folder_settings()
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
        if self.start_density is not None:
            if not self.density <= self.start_density:
                raise ConfigError(f"start_density must be in [density, 1], got "
                                  f"{self.start_density} with density {self.density}")
            if (self.method, self.dense) != (Method.DNR.value, False):
                raise ConfigError("start_density is for --method dnr (the baselines' masks are "
                                  "fixed or set once)")
        try:
            self.rewire_schedule()
            Redistribution(self.redistribution)
            ChannelShares(self.channel_shares)
            Init(self.init)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            Loss(self.loss)
        except ValueError:
            allowed = ", ".join(v.value for v in Loss)
            raise ConfigError(f"unknown loss {self.loss!r}; available: {allowed}") from None
        if self.attack_bn not in ("eval", "train"):
            raise ConfigError(f"attack_bn must be 'eval' or 'train', got {self.attack_bn!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; available: cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to torch here")
        eps = spec.eps if self.eps is None else self.eps
        return dataclasses.replace(
            self,
            rewire_until=self.rewire_schedule().until,
            eps=eps,
            pgd_step_size=self.pgd_step_size or spec.pgd_step_size * eps / spec.eps,
            eval_pgd7_step_size=self.eval_pgd7_step_size or spec.eval_pgd7_step_size,
        )

    def _check_folder_settings(self) -> None:
        """Raises:
            ConfigError: a folder setting that does not parse, or one given for another dataset.
        """
        from dnr_deploy.data.folder import parse_floats, parse_image_size

        given = [name for name in ("image_size", "channels", "mean", "std")
                 if getattr(self, name) is not None]
        if self.dataset != "folder":
            if given:
                raise ConfigError(f"{given[0]} is for --dataset folder (your own images); "
                                  f"{self.dataset} has a fixed size and normalization")
            return
        if not self.data_dir:
            raise ConfigError("--dataset folder needs --data-dir PATH, PATH holding "
                              "train/CLASS/*.png (and val/ or test/ alike)")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        try:
            if self.image_size is not None:
                parse_image_size(self.image_size)
            if self.mean is not None:
                parse_floats(self.mean, "mean")
            if self.std is not None:
                parse_floats(self.std, "std", positive=True)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def rewire_schedule(self) -> RewireSchedule:
        """When DNR rewires and how much.

        Raises:
            ValueError: a rewire setting out of range.
        """
        until = self.rewire_until
        if until is None:
            until = REWIRE_UNTIL[self.granularity]
        return RewireSchedule(self.rewire_every, self.prune_rate, until)

    def with_start_density(self, rewires: int) -> CompressConfig:
        """A copy with DNR's `start_density` decided for a run that gets `rewires` rewires.

        Unset means dense (1.0) for irregular DNR, the start measured best (docs/decisions/
        2026-11-25-irregular-dense-start.md; figures in docs/results.md),
        unless the run is too short to rewire. Channel DNR starts at the target: its dense
        start measured worse (docs/results.md). Starting at the target is the paper's DNR; the
        field then stays None.

        Raises:
            ConfigError: a start above the target that no rewire would close in from.
        """
        if self.method != Method.DNR.value or self.dense:
            return self
        if self.start_density is None:
            dense_start = rewires > 0 and self.granularity == Granularity.IRREGULAR.value
            return dataclasses.replace(self, start_density=1.0 if dense_start else None)
        if self.start_density > self.density and not rewires:
            raise ConfigError(
                f"start_density {self.start_density:g} needs a rewire to reach the target "
                f"density, and this run gets none (rewire_every {self.rewire_every}, "
                f"rewire_until {self.rewire_schedule().until}); use --start-density "
                f"{self.density:g}")
        return self
