"""Every setting of a verification (VerifyConfig) and its validation, in a module that imports
no torch or ONNX Runtime: `dnr-verify --help` builds its parser from these fields at once.
Re-exported by dnr_deploy.runtime.verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dnr_deploy.config import option
from dnr_deploy.parity import (
    PARITY_ATOL,
    PARITY_RTOL,
    ROUNDING_FACTOR,
    check_parity_settings,
)
from dnr_deploy.vocabulary import AttackName

if TYPE_CHECKING:
    from dnr_deploy.attacks import EnsembleConfig


class VerifyError(ValueError):
    """Bad input to verify: options out of range, a threat model it cannot run."""


def check_eps(eps: float, where: str) -> float:
    """Raises:
        VerifyError: eps outside (0, 1] (pixel units)."""
    if not 0 < eps <= 1:
        raise VerifyError(f"{where} must be in (0, 1] (pixel units of [0, 1] images), "
                          f"got {eps}")
    return float(eps)


@dataclass
class VerifyConfig:
    """Every setting of a verification; the only place their defaults are written."""

    deploy_dir: str | None = None  # None: the latest run's deploy dir
    dataset: str | None = option(
        None, "dataset of the test split (default: the manifest's)")
    data_dir: str | None = option(
        None, "folder holding the dataset (default: the one recorded at export)")
    attack: str = option(
        AttackName.AUTOATTACK.value,
        'autoattack: APGD-CE, APGD-T, Square in sequence, worst case per image (white-box '
        'parts on the re-imported ONNX graph, Square on ONNX Runtime queries); or one of '
        "them; pgd: PGD-20 as the training side's")
    eps: float | None = option(
        None, "Linf radius in (0, 1] (default: the manifest's threat model)")
    steps: int | None = option(
        None, 'APGD iterations (default 100) or, for pgd, PGD steps (default 20)')
    queries: int = option(5000, "Square's query budget per image")
    targets: int = option(9, 'APGD-T target classes')
    p_init: float = option(0.8, 'Square: initial fraction of the image one square covers')
    n: int | None = option(
        None, 'score the first N test images (default: those the training side attacked)')
    tolerance: float = option(
        1.0,
        'percentage points the worst-case robust accuracy may fall below the training '
        "side's AutoAttack-grade figure before the exit code is 1")
    min_robust: float | None = option(
        None,
        'absolute floor: exit code 1 when the worst-case robust accuracy is below this '
        'percentage')
    no_gate: bool = option(
        False, 'do not compare with the training side (--min-robust still applies)')
    batch_size: int = option(128, 'images per batch')
    provider: str = option("cpu", 'ONNX Runtime execution provider')
    threads: int = option(1, 'threads of the runtime that scores (ONNX Runtime intra-op, '
                          'sparse kernels)')
    runtime: str = option(
        "ort", "what scores the images: ort (ONNX Runtime, model.onnx) or sparse (the CSR "
        "weights in dnr_deploy.runtime.sparse; irregular deploy dirs only, checked against "
        "ONNX Runtime on the clean images first); gradients always come from model.onnx")
    parity_atol: float = option(
        PARITY_ATOL,
        'largest |logit difference| allowed between the re-imported graph and ONNX Runtime')
    parity_rtol: float = option(
        PARITY_RTOL, "plus this fraction of the largest |logit| (float32 rounding grows with the "
        "logits; export's gate allows the same)")
    parity_rounding_factor: float = option(
        ROUNDING_FACTOR, "or, if larger, this many times the re-import's own float32 rounding "
        "(|float32 - float64| logits), export's rule")
    seed: int = option(0, "seed of the attacks' randomness")
    examples: int = option(8, 'images in the example grid')
    out: str | None = option(
        None, 'folder for verify.json and the examples (default: DEPLOY_DIR/reports)')
    sign: str | None = option(
        None, "private key (PEM, elliptic curve) to sign the deploy dir with once the gate "
        "passed: writes DEPLOY_DIR/verify.json, the verified claim, and DEPLOY_DIR/model.sig "
        "over it and every file; a failed gate signs nothing")
    verify_key: str | None = option(
        None, "public key (PEM) whose private key must have signed the deploy dir (model.sig "
        "over every file): a missing or invalid signature, or any file changed or added after "
        "signing, is refused (exit 2)")

    def validated(self) -> VerifyConfig:
        """Raises:
            VerifyError: an unknown attack or provider, or a value out of range."""
        from dnr_deploy.runtime.runtimes import parse_placement

        try:
            AttackName(self.attack)
        except ValueError:
            known = ", ".join(a.value for a in AttackName)
            raise VerifyError(f"unknown attack {self.attack!r}; available: {known}") from None
        try:
            parse_placement(self.runtime, self.provider)
        except ValueError as err:
            raise VerifyError(str(err)) from None
        if self.eps is not None:
            check_eps(self.eps, "--eps")
        for name in ("steps", "n", "batch_size", "threads", "targets"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VerifyError(f"{name} must be at least 1, got {value}")
        if self.queries < 2:
            raise VerifyError(f"queries must be at least 2, got {self.queries}")
        if not 0 < self.p_init <= 1:
            raise VerifyError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.min_robust is not None and not 0 <= self.min_robust <= 100:
            raise VerifyError(f"min_robust is a percentage in [0, 100], got {self.min_robust}")
        check_parity_settings(self.parity_rtol, self.parity_rounding_factor, VerifyError)
        if self.tolerance < 0 or self.parity_atol <= 0 or self.examples < 0:
            raise VerifyError("tolerance and examples must be >= 0 and parity_atol > 0")
        return self

    def ensemble(self) -> EnsembleConfig:
        from dnr_deploy.attacks import EnsembleConfig

        pgd = self.attack == AttackName.PGD.value
        return EnsembleConfig(
            attack=self.attack, apgd_steps=self.steps or EnsembleConfig.apgd_steps,
            target_classes=self.targets, square_queries=self.queries,
            square_p_init=self.p_init, seed=self.seed, batch_size=self.batch_size,
            pgd_steps=(self.steps if pgd and self.steps else EnsembleConfig.pgd_steps))
