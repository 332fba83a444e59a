"""Clean and robust accuracy of the deployed artifact itself (what `dnr-verify` runs).

Nothing here touches the training model. `pgd` is white-box on the artifact: gradients come
from model.onnx re-imported into PyTorch (`onnx_torch.OnnxTorch`), which is checked against
ONNX Runtime on every batch (clean and adversarial logits within `parity_atol`), and the
adversarial images are scored by ONNX Runtime. `square` is score-based and only queries the
ONNX Runtime session: the cross-check for gradient masking.

The result is compared with the training-side figures in the manifest (PGD-20 at step eps/4
with a random start, on the run's full test split); the gate fails when the artifact's robust
accuracy is lower by more than `tolerance` percentage points.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dnr_deploy.attacks import pgd, seeded_start
from dnr_deploy.checkpoint import write_json
from dnr_deploy.data import load_data, test_subset
from dnr_deploy.runtime import deploydir, plots, verdict
from dnr_deploy.runtime.onnx_torch import load_onnx_torch
from dnr_deploy.runtime.session import create_session, parse_provider, run_logits
from dnr_deploy.runtime.square import square_attack

VERIFY_FORMAT = "dnr-deploy/verify/1"
VERIFY_JSON = "verify.json"
EXAMPLES_PNG = "verify_examples.png"


class AttackName(str, Enum):
    PGD = "pgd"  # white-box, gradients of the re-imported graph
    SQUARE = "square"  # score-based, ONNX Runtime queries only


class VerifyError(ValueError):
    """Bad input to verify: options out of range, a threat model it cannot run."""


class VerifyWarning(RuntimeWarning):
    """A symptom worth a look that does not stop verification (probabilities instead of
    logits, zero input gradients, a source run changed since export)."""


class VerifyCheckFailed(RuntimeError):
    """A check that ran and failed: the re-import drifted from ONNX Runtime, or an attack left
    the eps ball or the pixel range. Nothing the gate could trust was measured."""


@dataclass
class VerifyConfig:
    """Every setting of a verification; the only place their defaults are written."""

    PGD_STEPS: ClassVar[int] = 20  # the run's PGD-20
    SQUARE_QUERIES: ClassVar[int] = 5000  # AutoAttack's standard budget

    deploy_dir: str | None = None  # None: the latest run's deploy dir
    dataset: str | None = None  # None: the source run's (from its run.json)
    data_dir: str | None = None  # None: the source run's
    attack: str = AttackName.PGD.value
    eps: float | None = None  # None: the manifest's threat model
    steps: int | None = None  # PGD steps or Square queries; None: PGD_STEPS / SQUARE_QUERIES
    step_size: float | None = None  # PGD step; None: eps / 4 as in the run's PGD-20
    p_init: float = 0.8  # Square: initial fraction of the image one square covers
    n: int | None = None  # first n test images; None: the whole test split
    tolerance: float = 1.0  # percentage points the robust accuracy may fall below training's
    batch_size: int = 128
    provider: str = "cpu"
    threads: int = 1
    parity_atol: float = 1e-4  # re-imported graph vs ONNX Runtime, max |logit difference|
    seed: int = 0
    examples: int = 8  # images in the example grid
    out: str | None = None  # None: DEPLOY_DIR/reports

    def validated(self) -> VerifyConfig:
        """Raises:
            VerifyError: an unknown attack or provider, or a value out of range."""
        try:
            AttackName(self.attack)
            parse_provider(self.provider)
        except ValueError as err:
            known = ", ".join(a.value for a in AttackName)
            raise VerifyError(str(err) if "provider" in str(err)
                              else f"unknown attack {self.attack!r}; available: {known}") from None
        if self.eps is not None:
            check_eps(self.eps, "--eps")
        for name in ("steps", "n", "batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VerifyError(f"{name} must be at least 1, got {value}")
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise VerifyError(f"step_size must be in (0, 1], got {self.step_size}")
        if not 0 < self.p_init <= 1:
            raise VerifyError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.tolerance < 0 or self.parity_atol <= 0 or self.examples < 0:
            raise VerifyError("tolerance and examples must be >= 0 and parity_atol > 0")
        return self

    def attack_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return self.PGD_STEPS if self.attack == AttackName.PGD.value else self.SQUARE_QUERIES


@dataclass
class VerifyResult:
    report: dict
    out_dir: Path
    passed: bool
    warnings: list[str] = field(default_factory=list)


def check_eps(eps: float, where: str) -> float:
    """Raises:
        VerifyError: eps outside (0, 1] (pixel units)."""
    if not 0 < eps <= 1:
        raise VerifyError(f"{where} must be in (0, 1] (pixel units of [0, 1] images), "
                          f"got {eps}")
    return float(eps)


def check_perturbation(x_adv: np.ndarray, x: np.ndarray, eps: float) -> float:
    """The largest |x_adv - x|.

    Raises:
        VerifyCheckFailed: a perturbation beyond eps + 1e-6, or a pixel outside [0, 1].
    """
    largest = float(np.abs(x_adv - x).max()) if x.size else 0.0
    if largest > eps + 1e-6:
        raise VerifyCheckFailed(f"an adversarial image is {largest:.6g} from its original, "
                                f"beyond eps {eps:.6g}: the attack is broken, nothing scored")
    if x_adv.size and (x_adv.min() < 0.0 or x_adv.max() > 1.0 or not np.isfinite(x_adv).all()):
        raise VerifyCheckFailed("an adversarial image left the [0, 1] pixel range (or holds NaN)")
    return largest


def verify(config: VerifyConfig) -> VerifyResult:
    """Score the deploy dir `config` names and compare with its training-side figures.

    Raises:
        VerifyError, DeployDirError, ManifestError, SessionError, DataError,
        UnsupportedGraphError: bad input; nothing is written.
        VerifyCheckFailed: a check ran and failed (see the class); nothing is written.
    """
    start = time.perf_counter()
    config = config.validated()
    deploy = deploydir.open_deploy_dir(config.deploy_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps, threat = _threat_model(deploy.manifest, config)
        source = deploydir.find_dataset(deploy, config.dataset, config.data_dir)
        bundle = load_data(source.dataset, source.data_dir)
        x, y = test_subset(bundle, config.n)
        session, info = create_session(deploy.file(deploydir.MODEL_FILE), config.provider,
                                       config.threads)
        attack = AttackName(config.attack)
        graph = load_onnx_torch(deploy.file(deploydir.MODEL_FILE)) if attack is \
            AttackName.PGD else None
        scores = _score(session, graph, x, y, eps, config)
    # ours go into the report; every warning is re-emitted for the caller
    messages = [str(w.message) for w in caught
                if issubclass(w.category, (VerifyWarning, deploydir.SourceRunWarning))]
    for caught_warning in caught:
        warnings.warn(caught_warning.message, stacklevel=2)
    report = _report(deploy, config, eps, threat, source, len(bundle.test), scores, info)
    report["warnings"] = messages
    report["seconds"] = round(time.perf_counter() - start, 3)
    out_dir = deploydir.reports_dir(deploy, config.out)
    if scores.examples:
        report["examples"] = EXAMPLES_PNG
        plots.save_examples(out_dir / EXAMPLES_PNG, *scores.examples, eps=eps)
    write_json(out_dir / VERIFY_JSON, report)
    return VerifyResult(report, out_dir, report["comparison"]["passed"], messages)


def _threat_model(manifest: dict, config: VerifyConfig) -> tuple[float, dict]:
    threat = manifest.get("threat_model") or {}
    norm = threat.get("norm", "Linf")
    if norm != "Linf":
        raise VerifyError(f"the manifest's threat model is {norm!r}; verify runs Linf attacks")
    if config.eps is not None:
        return check_eps(config.eps, "--eps"), {"norm": "Linf", "eps": config.eps, "from": "--eps"}
    try:
        recorded = float(threat["eps"])
    except (KeyError, TypeError, ValueError):
        raise VerifyError(f"the manifest records no usable threat-model eps "
                          f"({threat.get('eps')!r}); pass --eps") from None
    eps = check_eps(recorded, "the manifest's threat-model eps")
    return eps, {"norm": "Linf", "eps": eps, "from": "manifest"}


@dataclass
class _Scores:
    clean: int = 0
    robust: int = 0
    count: int = 0
    max_perturbation: float = 0.0
    parity_clean: float = 0.0
    parity_adv: float = 0.0
    zero_grad: int = 0
    queries: list = field(default_factory=list)
    examples: tuple | None = None


def _score(session, graph, x: torch.Tensor, y: torch.Tensor, eps: float,
           config: VerifyConfig) -> _Scores:
    scores = _Scores()
    picked: list = []
    step = config.step_size or eps / 4
    for index, begin in enumerate(range(0, len(x), config.batch_size)):
        xb, yb = x[begin:begin + config.batch_size], y[begin:begin + config.batch_size]
        x_np, y_np = xb.numpy().astype(np.float32), yb.numpy()
        clean_logits = run_logits(session, x_np, config.batch_size)
        if index == 0:
            _warn_if_probabilities(clean_logits)
        if graph is not None:
            scores.parity_clean = max(scores.parity_clean,
                                      _parity(graph, xb, clean_logits, config, index, "clean"))
            scores.zero_grad += _zero_gradients(graph, xb, yb)
            start = seeded_start(xb, eps, config.seed, begin)  # training side's EVAL_SEED = 0
            x_adv = pgd(graph, xb, yb, eps, step, config.attack_steps(), start=start)
            x_adv_np = x_adv.numpy()
        else:
            result = square_attack(lambda a: run_logits(session, a, config.batch_size), x_np,
                                   y_np, eps, config.attack_steps(), config.p_init,
                                   config.seed + index)
            x_adv, x_adv_np = None, result.x_adv
            scores.queries.extend(result.queries.tolist())
        largest = check_perturbation(x_adv_np, x_np, eps)
        adv_logits = run_logits(session, x_adv_np, config.batch_size)
        if graph is not None:
            scores.parity_adv = max(scores.parity_adv,
                                    _parity(graph, x_adv, adv_logits, config, index, "adversarial"))
        pred_clean, pred_adv = clean_logits.argmax(1), adv_logits.argmax(1)
        scores.clean += int((pred_clean == y_np).sum())
        scores.robust += int((pred_adv == y_np).sum())
        scores.count += len(y_np)
        scores.max_perturbation = max(scores.max_perturbation, largest)
        picked.extend(_candidates(x_np, x_adv_np, y_np, pred_clean, pred_adv))
    if scores.zero_grad:
        warnings.warn(f"{scores.zero_grad} of {scores.count} images have an all-zero input "
                      "gradient in the re-imported graph: PGD cannot move them (gradient "
                      "masking?); cross-check with --attack square", VerifyWarning, stacklevel=2)
    if picked and config.examples:
        picked.sort(key=lambda item: item[0])  # successful attacks first
        rows = [item[1:] for item in picked[:config.examples]]
        scores.examples = tuple(np.stack(column) for column in zip(*rows, strict=True))
    return scores


def _parity(graph, xb: torch.Tensor, ort_logits: np.ndarray, config: VerifyConfig, index: int,
            what: str) -> float:
    """Max |re-imported graph - ONNX Runtime| on one batch.

    Raises:
        VerifyCheckFailed: beyond `parity_atol`: the gradients would not be the artifact's.
    """
    with torch.no_grad():
        ours = graph(xb).numpy()
    diff = float(np.abs(ours.astype(np.float64) - ort_logits).max()) if len(ours) else 0.0
    if not diff <= config.parity_atol:
        raise VerifyCheckFailed(
            f"the PyTorch re-import of model.onnx differs from ONNX Runtime by {diff:.3g} "
            f"(limit {config.parity_atol:g}) on the {what} images of batch {index + 1}: its "
            "gradients would not be the artifact's, so verify stopped"
        )
    return diff


def _zero_gradients(graph, xb: torch.Tensor, yb: torch.Tensor) -> int:
    x = xb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(graph(x), yb, reduction="sum"), x)
    return int((grad.flatten(1).abs().amax(1) == 0).sum())


def _warn_if_probabilities(logits: np.ndarray) -> None:
    rows = logits.astype(np.float64)
    if rows.size and rows.min() >= 0 and rows.max() <= 1 and np.allclose(rows.sum(1), 1, atol=1e-3):
        warnings.warn("model.onnx outputs probabilities (rows sum to 1), not logits: "
                      "cross-entropy on softmax outputs flattens the gradients PGD follows; "
                      "export the network without its softmax", VerifyWarning, stacklevel=3)


def _candidates(x, x_adv, y, pred_clean, pred_adv) -> list:
    """(priority, clean, adversarial, label, clean prediction, adversarial prediction)."""
    fooled = (pred_clean == y) & (pred_adv != y)
    order = np.argsort(~fooled, kind="stable")[:16]
    return [(0 if fooled[i] else 1, x[i], x_adv[i], y[i], pred_clean[i], pred_adv[i])
            for i in order]


def _report(deploy, config: VerifyConfig, eps: float, threat: dict, source, total: int,
            scores: _Scores, info) -> dict:
    manifest = deploy.manifest
    attack = AttackName(config.attack)
    accuracy = {"clean": scores.clean / scores.count, "robust": scores.robust / scores.count}
    trained = manifest.get("accuracy") or {}
    subset = scores.count < total
    notes = []
    if subset:
        notes.append(f"the training-side figure is on all {total} test images, this run on the "
                     f"first {scores.count}: the gap includes sampling noise")
    if attack is AttackName.PGD:
        details = {"name": "pgd", "steps": config.attack_steps(),
                   "step_size": config.step_size or eps / 4, "random_start": True,
                   "seed": config.seed, "loss": "cross-entropy",
                   "gradients": "model.onnx re-imported into PyTorch (dnr_deploy.runtime."
                   "onnx_torch)", "scored_by": "onnxruntime"}
        if config.attack_steps() != VerifyConfig.PGD_STEPS or config.step_size:
            notes.append("the PGD settings differ from the training side's PGD-20")
    else:
        queries = np.asarray(scores.queries)
        details = {"name": "square", "queries": config.attack_steps(), "p_init": config.p_init,
                   "loss": "margin", "seed": config.seed, "mean_queries": float(queries.mean()),
                   "median_queries": float(np.median(queries)), "scored_by": "onnxruntime"}
        notes.append("Square is compared with the training side's PGD-20; Square below PGD-20 "
                     "by more than the tolerance suggests gradient masking")
    return {
        "format": VERIFY_FORMAT,
        "deploy_dir": str(deploy.path.resolve()),
        "model_sha256": manifest["files"][deploydir.MODEL_FILE]["sha256"],
        "granularity": manifest.get("granularity"),
        "attack": details,
        "threat_model": threat,
        "images": {"dataset": source.dataset, "dataset_from": source.origin, "split": "test",
                   "first": scores.count, "of": total, "subset": subset},
        "accuracy": accuracy,
        "training_side": {"clean": trained.get("clean"),
                          "robust": trained.get(verdict.TRAINING_SIDE_KEY),
                          "attack": verdict.TRAINING_SIDE_KEY,
                          "images": f"all {total} test images"},
        "comparison": verdict.compare(accuracy, manifest, eps, config.tolerance, notes),
        "checks": {"max_perturbation": scores.max_perturbation, "in_pixel_range": True,
                   "eps_bound": eps + 1e-6,
                   **({"reimport_vs_ort_max_abs_clean": scores.parity_clean,
                       "reimport_vs_ort_max_abs_adversarial": scores.parity_adv,
                       "parity_atol": config.parity_atol,
                       "zero_gradient_images": scores.zero_grad}
                      if attack is AttackName.PGD else {})},
        "session": info.as_dict(),
        "config": asdict(config),
    }
