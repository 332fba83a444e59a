"""Every setting of a verification (VerifyConfig) and its validation, in a module that imports
no torch or ONNX Runtime: `dnr-verify --help` builds its parser from these fields at once.
Re-exported by dnr_deploy.runtime.verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dnr_deploy.config import Bounds, check_settings, option
from dnr_deploy.files import is_number
from dnr_deploy.parity import (
    PARITY_ATOL,
    PARITY_RTOL,
    PARITY_RTOL_BOUNDS,
    ROUNDING_FACTOR,
    ROUNDING_FACTOR_BOUNDS,
)
from dnr_deploy.vocabulary import AttackName

if TYPE_CHECKING:
    from dnr_deploy.attacks import EnsembleConfig


class VerifyError(ValueError):
    """Bad input to verify: options out of range, a threat model it cannot run."""


def check_eps(eps: float, where: str) -> float:
    """Raises:
        VerifyError: eps not a finite number in (0, 1] (pixel units)."""
    if not is_number(eps) or not Bounds("(0, 1]").admits(eps):
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
        None, "Linf radius in pixel units (default: the manifest's threat model)", '(0, 1]')
    steps: int | None = option(
        None, 'APGD iterations (default 100) or, for pgd, PGD steps (default 20)', '>= 1')
    queries: int = option(5000, "Square's query budget per image", '>= 2')
    targets: int = option(9, 'APGD-T target classes', '>= 1')
    p_init: float = option(0.8, 'Square: initial fraction of the image one square covers',
                           '(0, 1]')
    n: int | None = option(
        None, 'score the first N test images (default: those the training side attacked)',
        '>= 1')
    tolerance: float = option(
        1.0,
        'percentage points the worst-case robust accuracy (and the clean accuracy) may fall '
        "below the training side's AutoAttack-grade (and clean) figure before the exit code "
        "is 1", '[0, 100]')
    min_robust: float | None = option(
        None,
        'absolute floor: exit code 1 when the worst-case robust accuracy is below this '
        'percentage', '[0, 100]')
    no_gate: bool = option(
        False, 'do not compare with the training side (--min-robust still applies)')
    batch_size: int = option(128, 'images per batch', '>= 1')
    provider: str = option("cpu", 'ONNX Runtime execution provider')
    threads: int = option(1, 'threads of the runtime that scores (ONNX Runtime intra-op, '
                          'sparse kernels)', '>= 1')
    runtime: str = option(
        "auto", "what scores the images: ort (ONNX Runtime), sparse (the sparse engine of "
        "dnr_deploy.runtime.sparse on model.onnx's sparse weights; irregular deploy dirs "
        "only, checked against ONNX Runtime on the clean images first) or auto (sparse for an "
        "irregular float deploy dir on the CPU whose ops it runs, else ort); gradients always "
        "come from model.onnx")
    model: str | None = option(
        None, "kept for scripts: the sparse engine reads model.onnx and never imports the "
        "manifest's MODULE:FACTORY (it used to rebuild the model; named here, or with "
        "--trust-model-code, it was imported)")
    trust_model_code: bool = option(
        False, "import whatever MODULE:FACTORY the manifest names (runs its code)")
    parity_atol: float = option(
        PARITY_ATOL,
        'largest |logit difference| allowed between the re-imported graph and ONNX Runtime',
        '> 0')
    parity_rtol: float = option(
        PARITY_RTOL, "plus this fraction of the largest |logit| (float32 rounding grows with the "
        "logits; export's gate allows the same)", PARITY_RTOL_BOUNDS)
    parity_rounding_factor: float = option(
        ROUNDING_FACTOR, "or, if larger, this many times the re-import's own float32 rounding "
        "(|float32 - float64| logits), export's rule", ROUNDING_FACTOR_BOUNDS)
    seed: int = option(0, "seed of the attacks' randomness", '[0, 2**63)')
    examples: int = option(8, 'images in the example grid', '>= 0')
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

        check_settings(self, VerifyError)  # finite and in range: every numeric field
        try:
            AttackName(self.attack)
        except ValueError:
            known = ", ".join(a.value for a in AttackName)
            raise VerifyError(f"unknown attack {self.attack!r}; available: {known}") from None
        try:
            parse_placement(self.runtime, self.provider)
        except ValueError as err:
            raise VerifyError(str(err)) from None
        from dnr_deploy.resources import check_threads

        check_threads(self.threads, "--threads", VerifyError)
        return self

    def ensemble(self) -> EnsembleConfig:
        from dnr_deploy.attacks import EnsembleConfig

        pgd = self.attack == AttackName.PGD.value
        return EnsembleConfig(
            attack=self.attack, apgd_steps=self.steps or EnsembleConfig.apgd_steps,
            target_classes=self.targets, square_queries=self.queries,
            square_p_init=self.p_init, seed=self.seed, batch_size=self.batch_size,
            pgd_steps=(self.steps if pgd and self.steps else EnsembleConfig.pgd_steps))
