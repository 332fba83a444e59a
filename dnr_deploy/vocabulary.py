"""The closed vocabularies of the settings (str-valued enums), in a module that imports no torch,
so that the console scripts can build their parsers and answer `--help` at once. Each enum is
re-exported from the module that uses it (sparsity.masks, sparsity.rewire, data, training,
export.quantize, attacks)."""

from __future__ import annotations

from enum import Enum


class Granularity(str, Enum):
    """What a run prunes: single weights or whole output channels."""

    IRREGULAR = "irregular"
    CHANNEL = "channel"


class Init(str, Enum):
    """How a run's first masks spread the budget over layers."""

    UNIFORM = "uniform"  # every layer at the target density
    ERK = "erk"  # Erdos-Renyi-Kernel (Evci et al. 2020): small layers denser, large sparser


class Redistribution(str, Enum):
    """How the weights freed by pruning are regrown across layers."""

    MOMENTUM = "momentum"  # DNR: as the layers' momentum of the hybrid loss decides
    NONE = "none"  # each layer regrows what it pruned (the ablation)


class ChannelShares(str, Enum):
    """How channel mode weighs each unit group's momentum when it splits the freed budget."""

    COST = "cost"  # times what its active units cost in the shrunk network (the default)
    SIZE = "size"  # times the group's dense rows (its filters and consumer slices, all units)


class Loss(str, Enum):
    """The adversarial training objective."""

    HYBRID = "hybrid"  # beta * CE(clean) + (1 - beta) * CE(PGD): the DNR paper's
    TRADES = "trades"  # CE(clean) + trades_beta * KL(f(x_adv) || f(x)) (Zhang et al. 2019)


class DatasetName(str, Enum):
    DIGITS = "digits"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    TINYIMAGENET = "tinyimagenet"
    FOLDER = "folder"  # your own images: --data-dir PATH with train/CLASS/*.png


class Method(str, Enum):
    """How sparsity is reached; each is one policy plugged into the same training loop."""

    DNR = "dnr"  # Dynamic Network Rewiring (this project's method)
    STATIC = "static"  # random masks (single weights or channel units), never rewired
    MAGNITUDE = "magnitude"  # dense half, global magnitude prune, fine-tune half


class ReduceRange(str, Enum):
    """What export's `--reduce-range` accepts."""

    AUTO = "auto"  # on unless this CPU has VNNI
    ON = "on"
    OFF = "off"


class AttackName(str, Enum):
    """What `dnr-verify --attack` and the evaluation accept."""

    AUTOATTACK = "autoattack"  # the ensemble below
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"
    SQUARE = "square"
    PGD = "pgd"  # PGD-20 at step eps/4 from a seeded random start: the project's old figure

    def members(self) -> tuple[AttackName, ...]:
        """The attacks this name runs, in order."""
        if self is AttackName.AUTOATTACK:
            return (AttackName.APGD_CE, AttackName.APGD_T, AttackName.SQUARE)
        return (self,)

    @property
    def white_box(self) -> bool:
        return self is not AttackName.SQUARE
