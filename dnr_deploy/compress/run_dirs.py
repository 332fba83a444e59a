"""Where a compress run writes, and whether a checkpoint may be continued: decided before any
training, so that bad input is one error and nothing is written."""

from __future__ import annotations

import re
import time
from pathlib import Path

from dnr_deploy.compress import byo
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress import distributed as ddp
from dnr_deploy.compress.training import (
    RESUME_FIXED,
    CompressConfig,
    ConfigError,
    settings_from_checkpoint,
)
from dnr_deploy.sparsity.masks import DENSE
from dnr_deploy.trust import UntrustedModelCode, check_spec_trusted, imports_code


def check_resume(config: CompressConfig, saved: object, where: str) -> None:
    """Raises:
        ConfigError: a setting a resumed run cannot change differs from the checkpoint's."""
    settings = settings_from_checkpoint(saved, where)
    saved_resolved = byo.resolve_recorded(CompressConfig(**settings))
    for name in RESUME_FIXED:
        saved_value, value = getattr(saved_resolved, name), getattr(config, name)
        if saved_value != value:
            raise ConfigError(
                f"--resume: the checkpoint was trained with {name}={saved_value!r}, "
                f"not {value!r}; drop that setting to continue it"
            )


def check_resumed_model_trusted(config: CompressConfig, saved: object, where: str) -> None:
    """A checkpoint's MODULE:FACTORY spec is imported only when this invocation names it
    (`--model`, `CompressConfig(model=...)`) or trusts model code.

    Raises:
        ConfigError: the checkpoint names model code the user did not name or trust.
    """
    spec = saved.get("model") if isinstance(saved, dict) else None
    if not imports_code(spec):
        return  # a registry name or torchvision:NAME; check_resume compares the rest
    named = None if config.model == CompressConfig().model else config.model
    try:
        check_spec_trusted(spec, where, named, config.trust_model_code)
    except UntrustedModelCode as err:
        raise ConfigError(str(err)) from None


def agree_on_run_dir(context: ddp.DistContext, config: CompressConfig) -> Path:
    """Rank 0 picks (and checks) the run dir; every rank gets its choice or its error."""
    decision: Path | str
    try:
        decision = choose_run_dir(config) if context.is_main else Path()
    except ConfigError as err:
        decision = str(err)
    decision = ddp.broadcast_object(context, decision)
    if isinstance(decision, str):
        raise ConfigError(decision)
    return decision


def choose_run_dir(config: CompressConfig) -> Path:
    """The resumed run's folder, an empty --out, or a new runs/STAMP-MODEL-DATASET-... name.

    Raises:
        ConfigError: --out exists and is not empty.
    """
    if config.resume:
        return ckpt.resolve_checkpoint(config.resume).parent
    if config.out:
        out = Path(config.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                f"--out {str(out)!r} exists and is not empty; use --resume to continue it"
            )
        return out
    kind = DENSE if config.dense else config.granularity
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = re.sub(r"[^\w.-]+", "-", config.model).strip("-")  # MODULE:FACTORY, <module: X>
    name = f"{stamp}-{model}-{config.dataset}-{kind}-d{config.density:g}-s{config.seed}"
    return Path("runs") / name
