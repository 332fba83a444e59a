"""An AutoAttack-grade ensemble: attacks in sequence, each on the images still robust, and the
robust accuracy as the per-image worst case (Croce & Hein 2020, version "standard" for Linf:
APGD-CE, APGD-T with 9 target classes, Square with 5,000 queries; FAB-T, a minimum-norm
attack, is left out: on the run measured, FAB-T and Square together took 0.55 points off what
torchattacks' APGD-CE + APGD-T left).

Two functions take part: `model` (torch, differentiable) gives the white-box gradients, and
`score` (numpy logits) decides which images are broken and answers Square's queries. For the
training side both are the network; for verify `score` is the ONNX Runtime session of the
artifact, so every figure is the deployed artifact's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dnr_deploy.attacks.apgd import apgd
from dnr_deploy.attacks.pgd import Classifier, pgd, seeded_start_at
from dnr_deploy.attacks.square import QueryFn, square_attack
from dnr_deploy.config import check_settings, option
from dnr_deploy.vocabulary import AttackName  # noqa: F401  (re-exported)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EnsembleConfig:
    """The attacks' budgets. The defaults are AutoAttack's standard settings; a dataset may
    lower them (see `data.DatasetSpec.autoattack`), and run.json records what ran."""

    attack: str = AttackName.AUTOATTACK.value
    apgd_steps: int = option(100, "APGD iterations", ">= 1")
    restarts: int = option(1, "APGD-CE restarts; APGD-T runs once per target class", ">= 1")
    target_classes: int = option(9, "APGD-T target classes", ">= 1")
    square_queries: int = option(5000, "Square's query budget per image", ">= 2")
    square_p_init: float = option(0.8, "Square's initial square fraction", "(0, 1]")
    pgd_steps: int = option(20, "PGD steps", ">= 1")
    seed: int = option(0, "seed of the attacks' randomness", "[0, 2**63)")
    batch_size: int = option(256, "images per batch", ">= 1")

    def validated(self) -> EnsembleConfig:
        """Raises:
            ValueError: an unknown attack or a budget out of range."""
        AttackName(self.attack)
        check_settings(self, ValueError)  # finite and in range: every numeric field
        return self


@dataclass
class Stage:
    """One attack of the sequence: how many images it attacked and broke, and the robust
    accuracy after it (cumulative: the worst case over this attack and those before)."""

    attack: str
    attacked: int
    broken: int
    robust_after: float
    seconds: float
    gradients: str = "model"  # "transfer": white-box on the `transfer` model, judged by score


@dataclass
class EnsembleResult:
    """Per-image outcome of a run; `x_adv` holds the breaking image where one was found."""

    count: int
    clean_correct: np.ndarray
    robust: np.ndarray
    x_adv: torch.Tensor
    stages: list[Stage] = field(default_factory=list)
    max_perturbation: float = 0.0
    pixel_range: tuple[float, float] = (0.0, 1.0)

    @property
    def clean(self) -> float:
        return float(self.clean_correct.mean()) if self.count else 0.0

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.mean()) if self.count else 0.0

    def as_dict(self) -> dict:
        return {"images": self.count, "clean": self.clean, "robust": self.robust_accuracy,
                "stages": [asdict(stage) for stage in self.stages],
                "max_perturbation": self.max_perturbation,
                "pixel_range": list(self.pixel_range)}


def torch_scorer(model: Classifier, batch_size: int = 256) -> QueryFn:
    """`model` as a numpy logits function (the training side's `score`)."""
    parameter = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def score(images: np.ndarray) -> np.ndarray:  # Square calls it thousands of times
        outputs = []
        with torch.no_grad():
            for begin in range(0, len(images), batch_size):
                chunk = torch.from_numpy(images[begin:begin + batch_size]).to(device)
                outputs.append(model(chunk).float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    return score


def run_ensemble(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, config: EnsembleConfig,
    score: QueryFn | None = None, progress: Progress | None = None,
    transfer: Classifier | None = None,
) -> EnsembleResult:
    """Attack (x, y) with `config.attack` and return the per-image worst case.

    Args:
        model: differentiable, images in [0, 1] -> logits; in eval mode (the caller's job).
        x, y: the evaluated images (CPU tensors or on the model's device) and labels; image i
            is index i of the evaluated set, which seeds its random starts.
        eps: L-infinity radius in pixel units.
        score: numpy logits function that judges success and answers Square's queries; the
            model itself when None.
        progress: called with a short line after each attack (and APGD-T target).
        transfer: a second differentiable model (an int8 graph's float original): its
            white-box attacks run after the others, on the images still robust, judged by
            `score`. Quantization can mask gradients (Bernhard et al. 2019), so an int8
            model's robustness is the worst case over its own and the float model's gradients.
    """
    config = config.validated()
    score = score or torch_scorer(model, config.batch_size)
    x_np, y_np = x.detach().cpu().numpy().astype(np.float32), y.cpu().numpy()
    correct = _predict(score, x_np, config.batch_size) == y_np
    result = EnsembleResult(len(y_np), correct, correct.copy(), x.detach().clone())
    members = AttackName(config.attack).members()
    plan = [(member, model, "model") for member in members]
    if transfer is not None:
        plan += [(member, transfer, "transfer") for member in members if member.white_box]
    for member, gradients, source in plan:
        label = member.value if source == "model" else f"{source}:{member.value}"
        started = time.perf_counter()
        before = int(result.robust.sum())
        attacked = _run_member(member, gradients, score, x, y, x_np, y_np, eps, config, result,
                               progress)
        result.stages.append(Stage(member.value, attacked, before - int(result.robust.sum()),
                                   result.robust_accuracy, time.perf_counter() - started,
                                   source))
        if progress:
            progress(f"{label}: robust {100 * result.robust_accuracy:.2f}% "
                     f"({time.perf_counter() - started:.1f} s)")
    delta = (result.x_adv.cpu() - x.cpu()).abs()
    result.max_perturbation = float(delta.max()) if delta.numel() else 0.0
    if result.x_adv.numel():
        result.pixel_range = (float(result.x_adv.min()), float(result.x_adv.max()))
    return result


def _predict(score: QueryFn, images: np.ndarray, batch_size: int) -> np.ndarray:
    labels = [score(images[b:b + batch_size]).argmax(1) for b in range(0, len(images), batch_size)]
    return np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)


def _run_member(member: AttackName, model, score, x, y, x_np, y_np, eps: float,
                config: EnsembleConfig, result: EnsembleResult, progress) -> int:
    """Run one attack on the images still robust; returns how many it attacked."""
    if member is AttackName.APGD_T:
        return _run_targeted(model, score, x, y, y_np, eps, config, result, progress)
    todo = np.flatnonzero(result.robust)
    if member is AttackName.SQUARE:  # image i draws from (seed, i): any batch, same squares
        for begin in range(0, len(todo), config.batch_size):
            rows = todo[begin:begin + config.batch_size]
            batch = f"square batch {begin // config.batch_size + 1}/" \
                    f"{-(-len(todo) // config.batch_size)}: "
            found = square_attack(score, x_np[rows], y_np[rows], eps, config.square_queries,
                                  config.square_p_init, config.seed, indices=rows,
                                  progress=progress and (
                                      lambda line, batch=batch: progress(batch + line)))
            _keep_breaks(result, rows, torch.from_numpy(found.x_adv), score, y_np)
        return len(todo)
    for restart in range(config.restarts if member is AttackName.APGD_CE else 1):
        rows_left = np.flatnonzero(result.robust)
        for begin in range(0, len(rows_left), config.batch_size):
            rows = rows_left[begin:begin + config.batch_size]
            index = torch.from_numpy(rows).to(x.device)
            xb, yb = x[index], y[index]
            if member is AttackName.PGD:
                start = seeded_start_at(xb, eps, config.seed, rows.tolist())
                x_adv = pgd(model, xb, yb, eps, eps / 4, config.pgd_steps, start=start)
            else:
                x_adv = apgd(model, xb, yb, eps, config.apgd_steps,
                             seed=config.seed + 7919 * restart, indices=index).x_adv
            _keep_breaks(result, rows, x_adv, score, y_np)
            if progress:
                progress(f"{member.value} batch {begin // config.batch_size + 1}/"
                         f"{-(-len(rows_left) // config.batch_size)}: robust "
                         f"{100 * result.robust_accuracy:.2f}% so far")
    return len(todo)


def _run_targeted(model, score, x, y, y_np, eps: float, config: EnsembleConfig,
                  result: EnsembleResult, progress) -> int:
    """APGD-T: one run per target class (2nd, 3rd, ... most likely class on the clean image)."""
    todo = np.flatnonzero(result.robust)
    logits = _predict_logits(model, x, config.batch_size)
    classes = logits.shape[1]
    if classes < 4:  # the DLR loss needs the 3rd and 4th logits
        return 0
    targets = min(config.target_classes, classes - 1)
    ranking = logits.argsort(1, descending=True).to(x.device)
    for rank in range(1, targets + 1):
        rows_left = np.flatnonzero(result.robust)
        for begin in range(0, len(rows_left), config.batch_size):
            rows = rows_left[begin:begin + config.batch_size]
            index = torch.from_numpy(rows).to(x.device)
            found = apgd(model, x[index], y[index], eps, config.apgd_steps,
                         target=ranking[index, rank],
                         seed=config.seed + 104_729 * rank, indices=index)
            _keep_breaks(result, rows, found.x_adv, score, y_np)
        if progress:
            progress(f"apgd-t target {rank}/{targets}: robust {100 * result.robust_accuracy:.2f}%")
    return len(todo)


def _predict_logits(model: Classifier, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[b:b + batch_size]).cpu()
                          for b in range(0, len(x), batch_size)])


def _keep_breaks(result: EnsembleResult, rows: np.ndarray, x_adv: torch.Tensor,
                 score: QueryFn, y_np: np.ndarray) -> None:
    """Mark the images of `rows` that `score` misclassifies on x_adv as broken."""
    adv_np = x_adv.detach().cpu().numpy().astype(np.float32)
    broken = score(adv_np).argmax(1) != y_np[rows]
    if broken.any():
        hit = rows[broken]
        result.robust[hit] = False
        result.x_adv[torch.from_numpy(hit).to(result.x_adv.device)] = \
            x_adv.detach()[torch.from_numpy(np.flatnonzero(broken)).to(x_adv.device)].to(
                result.x_adv.dtype)
