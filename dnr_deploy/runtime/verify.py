"""Clean and robust accuracy of the deployed artifact itself (what `dnr-verify` runs).

Nothing here touches the training model. The default attack is the AutoAttack-grade ensemble
(APGD-CE, APGD-T, Square; `dnr_deploy.attacks.ensemble`): its white-box parts take gradients
from model.onnx re-imported into PyTorch (`onnx_torch.OnnxTorch`), Square only queries the ONNX
Runtime session, and every candidate is judged by ONNX Runtime, so the worst case per image is
the deployed artifact's. Export fidelity is its own check: the re-import must match ONNX
Runtime on the clean and the final adversarial images, or verify stops (exit 1).

The result goes through the robustness gate of `verdict.compare`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dnr_deploy import deploydir
from dnr_deploy.attacks import AttackName, run_ensemble
from dnr_deploy.attacks.checks import run_checks
from dnr_deploy.compress.checkpoint import write_json
from dnr_deploy.compress.evaluation import protocol, terminal_progress
from dnr_deploy.data import test_subset
from dnr_deploy.deploydir import signing
from dnr_deploy.parity import ParityLimit, parity_limit
from dnr_deploy.resources import check_fits
from dnr_deploy.runtime import plots, verdict
from dnr_deploy.runtime.onnx_torch import load_onnx_torch
from dnr_deploy.runtime.runtimes import (
    Runtime,
    RuntimeChoiceError,
    SparseUnsupportedError,
    check_parity,
    choose_runtime,
    open_sparse,
    parity_reference,
    sparse_info,
)
from dnr_deploy.runtime.session import create_session, run_logits
from dnr_deploy.runtime.verify_config import VerifyConfig, VerifyError, check_eps  # noqa: F401

VERIFY_FORMAT = "dnr-deploy/verify/2"
VERIFY_JSON = "verify.json"
EXAMPLES_PNG = "verify_examples.png"
PIXEL_SLACK = 1e-6  # float32 rounding of x +- eps
INT8_GRADIENTS = (", int8 rounding passed straight through; then transfer attacks from "
                  "model.fp32.onnx (stages with gradients: transfer)")


class VerifyWarning(RuntimeWarning):
    """A symptom worth a look that does not stop verification (see attacks/checks.py)."""


class VerifyCheckFailed(RuntimeError):
    """A check that ran and failed: the re-import drifted from ONNX Runtime, or an attack left
    the eps ball or the pixel range. Nothing the gate could trust was measured."""


@dataclass
class VerifyResult:
    report: dict
    out_dir: Path
    passed: bool
    warnings: list[str] = field(default_factory=list)
    signature: Path | None = None  # --sign and a passed gate: DEPLOY_DIR/model.sig


def check_perturbation(x_adv: np.ndarray, x: np.ndarray, eps: float) -> dict:
    """The measured largest |x_adv - x| and pixel range.

    Raises:
        VerifyCheckFailed: a perturbation beyond eps, or a pixel outside [0, 1] (or NaN).
    """
    largest = float(np.abs(x_adv - x).max()) if x.size else 0.0
    low = float(x_adv.min()) if x_adv.size else 0.0
    high = float(x_adv.max()) if x_adv.size else 1.0
    figures = {"max_perturbation": largest, "eps_bound": eps + PIXEL_SLACK,
               "pixel_min": low, "pixel_max": high,
               "in_eps_ball": largest <= eps + PIXEL_SLACK,
               "in_pixel_range": bool(low >= 0.0 and high <= 1.0 and np.isfinite(x_adv).all())}
    if not figures["in_eps_ball"]:
        raise VerifyCheckFailed(f"an adversarial image is {largest:.6g} from its original, "
                                f"beyond eps {eps:.6g}: the attack is broken, nothing scored")
    if not figures["in_pixel_range"]:
        raise VerifyCheckFailed("an adversarial image left the [0, 1] pixel range (or holds NaN)")
    return figures


def verify(config: VerifyConfig, test_data: object = None) -> VerifyResult:
    """Attack the deploy dir `config` names and gate on the result.

    Args:
        test_data: a torch Dataset (or DataLoader) of the deployed dataset's image shape to
            attack instead of that dataset's test split (the Python API's way to verify on
            your own images; checked as `dnr_deploy.compress` checks it).

    With `config.sign` and a passed gate, the report also goes to DEPLOY_DIR/verify.json and
    the deploy dir is signed over it and every file (`deploydir.signing`): the signature then
    vouches for the verdict as well as the bytes. A failed gate signs nothing.

    Raises:
        VerifyError, DeployDirError, ManifestError, SessionError, DataError,
        UnsupportedGraphError: bad input (a bad signing key included, checked before any
            attack runs; with `config.verify_key`, a missing or invalid signature); nothing
            is written.
        VerifyCheckFailed: a check ran and failed (see the class); nothing is written.
    """
    start = time.perf_counter()
    config = config.validated()
    deploy = deploydir.open_deploy_dir(config.deploy_dir, config.verify_key)
    if config.sign:
        signing.check_private_key(config.sign, deploy.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps, threat = _threat_model(deploy.manifest, config)
        source = deploydir.find_dataset(deploy, config.dataset, config.data_dir)
        if test_data is None:
            bundle = source.load(deploy.manifest)
        else:
            from dnr_deploy.compress.byo import api_test_split

            bundle = api_test_split(source.dataset, test_data)
        recorded = (deploy.manifest.get("robustness") or {}).get("images")
        x, y = test_subset(bundle, config.n or recorded)
        _check_memory(deploy, config, len(x))
        session, info = create_session(deploy.file(deploydir.MODEL_FILE), config.provider,
                                       config.threads)
        session, runtime = _scorer(deploy, config, session, x)
        attack = AttackName(config.attack)
        graph = None if attack is AttackName.SQUARE else \
            load_onnx_torch(deploy.file(deploydir.MODEL_FILE))
        quantized = _quantization(deploy)
        transfer = load_onnx_torch(deploy.file(deploydir.FP32_MODEL_FILE)) \
            if quantized and graph is not None else None
        outcome = _attack(session, graph, x, y, eps, config, transfer,
                          _fidelity_atol(config, quantized))
    messages = outcome["sanity"].warnings + [
        str(w.message) for w in caught if issubclass(w.category, deploydir.SourceRunWarning)]
    for text in outcome["sanity"].warnings:
        warnings.warn(text, VerifyWarning, stacklevel=2)
    for caught_warning in caught:
        warnings.warn(caught_warning.message, stacklevel=2)
    report = _report(deploy, config, eps, threat, source, len(bundle.test), outcome, info,
                     api_images=test_data is not None)
    report["runtime"] = runtime
    report["signature"] = deploy.signature
    if runtime["name"] == Runtime.SPARSE.value:
        report["attack"]["scored_by"] = runtime["engine"]
    report["warnings"] = messages
    report["seconds"] = round(time.perf_counter() - start, 3)
    out_dir = deploydir.reports_dir(deploy, config.out)
    if outcome["examples"]:
        report["examples"] = EXAMPLES_PNG
        plots.save_examples(out_dir / EXAMPLES_PNG, *outcome["examples"], eps=eps,
                            class_names=deploy.manifest.get("class_names"))
    write_json(out_dir / VERIFY_JSON, report)
    passed = report["comparison"]["passed"]
    signature = None
    if config.sign and passed:  # the verdict goes inside the signature, never a failed one
        signing.write_claim(deploy.path, report)
        signature = signing.sign_deploy_dir(deploy.path, config.sign)
    return VerifyResult(report, out_dir, passed, messages, signature)


def _scorer(deploy, config: VerifyConfig, session, x: torch.Tensor) -> tuple:
    """What scores the images (`--runtime`; auto: the sparse engine for an irregular deploy
    dir whose ops it runs, else ONNX Runtime) and the report's record of it."""
    chosen, why = choose_runtime(config.runtime, deploy.manifest, config.provider)
    if chosen is not Runtime.SPARSE:
        return session, {"name": Runtime.ORT.value, "chosen_by": why}
    try:
        model, runtime = _sparse_scorer(deploy, config, session, x)
    except SparseUnsupportedError as err:
        if config.runtime != Runtime.AUTO:
            raise VerifyError(str(err)) from None
        return session, {"name": Runtime.ORT.value, "chosen_by": why,
                         "fallback": f"auto: ONNX Runtime, since {err}"}
    return model, {**runtime, "chosen_by": why}


# What one image's values cost in the attacks: the re-import's forward values, their gradients
# and autograd's saved copies, beside ONNX Runtime's own peak.
AUTOGRAD_COPIES = 3


def _check_memory(deploy, config: VerifyConfig, images: int) -> None:
    """Refuse a --batch-size whose activations would not fit in memory, before any session.

    Raises:
        VerifyError: naming the estimate and the memory available.
    """
    graph = deploy.graphs[deploydir.MODEL_FILE]
    batch = min(config.batch_size, max(images, 1))
    needed = batch * (AUTOGRAD_COPIES * graph.total_bytes_per_image + graph.peak_bytes_per_image)
    check_fits(needed, f"--batch-size {config.batch_size} ({batch} images at a time)",
               "use a smaller --batch-size", VerifyError)


def _sparse_scorer(deploy, config: VerifyConfig, session, x: torch.Tensor) -> tuple:
    """The sparse runtime, once it matches ONNX Runtime on the clean images: it then scores
    every candidate, so the artifact verified is the one deployed with it."""
    try:
        model = open_sparse(deploy.path, config.threads, config.verify_key, config.model,
                            config.trust_model_code)
        images = x.numpy().astype(np.float32)
        reference, atol = parity_reference(model, deploy.path, deploy.manifest, session)
        parity = check_parity(run_logits(model, images, config.batch_size),
                              run_logits(reference, images, config.batch_size),
                              "the clean images", atol)
    except SparseUnsupportedError:
        raise
    except RuntimeChoiceError as err:
        raise VerifyError(str(err)) from None
    return model, {**sparse_info(model, config.threads), "parity": parity}


def _quantization(deploy) -> dict | None:
    """The manifest's int8 record when the deploy dir holds an int8 model.onnx."""
    record = deploy.manifest.get("quantization")
    return record if isinstance(record, dict) and deploy.has(deploydir.FP32_MODEL_FILE) else None


def _fidelity_atol(config: VerifyConfig, quantized: dict | None) -> float:
    """How far the re-import may be from ONNX Runtime. The re-import of an int8 graph computes
    ONNX's reference int8 math, which the fused int8 kernels were allowed to miss by the
    export's int8 tolerance; float graphs get `parity_atol`."""
    if quantized is None:
        return config.parity_atol
    return max(config.parity_atol, float(quantized["int8_atol"]))


def _attack(session, graph, x: torch.Tensor, y: torch.Tensor, eps: float,
            config: VerifyConfig, transfer, atol: float) -> dict:
    """Fidelity, the ensemble (plus transfer attacks from the float model of an int8 deploy
    dir), the perturbation and sanity checks: everything measured."""
    def score(images: np.ndarray) -> np.ndarray:
        return run_logits(session, images, config.batch_size)

    x_np, y_np = x.numpy().astype(np.float32), y.numpy()
    clean_logits = score(x_np)
    fidelity = {}
    if graph is not None:
        fidelity["clean_max_abs"], _ = _parity(graph, x, clean_logits, config, "clean", atol)
    result = run_ensemble(graph, x, y, eps, config.ensemble(), score=score,
                          progress=terminal_progress("dnr-verify: "), transfer=transfer)
    adv_np = result.x_adv.numpy().astype(np.float32)
    adv_logits = score(adv_np)
    if graph is not None:
        fidelity["adversarial_max_abs"], limit = _parity(graph, result.x_adv, adv_logits,
                                                         config, "adversarial", atol)
        fidelity.update(limit.record())
    perturbation = check_perturbation(adv_np, x_np, eps)
    sanity = run_checks(graph, score, x, y, eps, result)
    pred_clean, pred_adv = clean_logits.argmax(1), adv_logits.argmax(1)
    return {"result": result, "fidelity": fidelity, "perturbation": perturbation,
            "sanity": sanity, "examples": _examples(x_np, adv_np, y_np, pred_clean, pred_adv,
                                                    config.examples)}


def _parity(graph, x: torch.Tensor, ort_logits: np.ndarray, config: VerifyConfig,
            what: str, atol: float) -> tuple[float, ParityLimit]:
    """Max |re-imported graph - ONNX Runtime| over the images, and the limit it was held to.

    Raises:
        VerifyCheckFailed: beyond the limit of `dnr_deploy.parity` (atol plus the larger of
            rtol x the largest |logit| and the re-import's own float32 rounding x a factor):
            the gradients would not be the artifact's.
    """
    with torch.no_grad():
        ours = torch.cat([graph(x[b:b + config.batch_size])
                          for b in range(0, len(x), config.batch_size)]).numpy()
    diff = float(np.abs(ours.astype(np.float64) - ort_logits).max()) if len(ours) else 0.0
    limit = parity_limit(graph, x, ours, atol, config.parity_rtol, config.parity_rounding_factor,
                         config.batch_size)  # the same rule as export's parity gate
    if not diff <= limit.limit:
        raise VerifyCheckFailed(
            f"the PyTorch re-import of model.onnx differs from ONNX Runtime by {diff:.3g} "
            f"({limit.describe()}) on the {what} images: its gradients would not be "
            "the artifact's, so verify stopped"
        )
    return diff, limit


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


def _examples(x, x_adv, y, pred_clean, pred_adv, count: int) -> tuple | None:
    """Up to `count` images for the grid, half where the attack succeeded and half where the
    model held (either kind fills the other's place when short), so the picture shows both."""
    fooled = np.flatnonzero((pred_clean == y) & (pred_adv != y))
    held = np.flatnonzero(pred_adv == y)
    take_fooled = min(len(fooled), max(count - len(held), (count + 1) // 2))
    order = np.concatenate([fooled[:take_fooled], held[:count - take_fooled]]).astype(int)
    if not count or not len(order):
        return None
    return x[order], x_adv[order], y[order], pred_clean[order], pred_adv[order]


def _report(deploy, config: VerifyConfig, eps: float, threat: dict, source, total: int,
            outcome: dict, info, api_images: bool = False) -> dict:
    manifest, result = deploy.manifest, outcome["result"]
    attack = AttackName(config.attack)
    ensemble = config.ensemble()
    accuracy = {"clean": result.clean, "robust": result.robust_accuracy}
    trained = manifest.get("accuracy") or {}
    robustness = manifest.get("robustness") or {}
    return {
        "format": VERIFY_FORMAT,
        "deploy_dir": str(deploy.path.resolve()),
        "model_sha256": manifest["files"][deploydir.MODEL_FILE]["sha256"],
        "granularity": manifest.get("granularity"),
        "attack": {"name": attack.value, "members": [m.value for m in attack.members()],
                   **protocol(ensemble), "pgd_steps": ensemble.pgd_steps,
                   "gradients": "model.onnx re-imported into PyTorch (dnr_deploy.runtime."
                   "onnx_torch)" + (INT8_GRADIENTS if _quantization(deploy) else ""),
                   "scored_by": "onnxruntime"},  # verify() names the sparse engine
        "threat_model": threat,
        "images": {"dataset": source.dataset, "dataset_from": source.origin,
                   "split": "test_data (Python API)" if api_images else "test",
                   "first": result.count, "of": total, "subset": result.count < total,
                   **({"class_names": manifest["class_names"]}
                      if manifest.get("class_names") else {})},
        "accuracy": accuracy,
        "stages": [asdict(stage) for stage in result.stages],
        "training_side": {"clean": trained.get("clean"),
                          "autoattack": trained.get(verdict.TRAINING_SIDE_KEY),
                          "pgd20": trained.get("pgd20"), "images": robustness.get("images"),
                          "protocol": robustness.get("protocol")},
        "fidelity": outcome["fidelity"],
        "comparison": verdict.compare(accuracy, manifest, eps, result.count, protocol(ensemble),
                                      config.tolerance, config.min_robust, not config.no_gate),
        "checks": {**outcome["perturbation"], **outcome["sanity"].figures},
        "session": info.as_dict(),
        "config": asdict(config),
    }
