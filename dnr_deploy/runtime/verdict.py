"""verify's verdict: the robustness gate, and the table on screen.

The gate compares the artifact's worst-case robust accuracy with the training side's
AutoAttack-grade figure (the manifest's `accuracy.autoattack`, from dnr-compress's final
evaluation on the same first test images, same seeds and budgets) under the same threat
model: it fails when the artifact is lower by more than the tolerance, or below the absolute
floor `--min-robust`, or when its clean accuracy is lower than the training side's clean figure
by more than the same tolerance (a weight edit can leave robust accuracy in place while clean
accuracy collapses: 94.7% -> 20% passed a robust-only gate). A manifest with no such figure,
or one measured at another eps, is not a pass (nothing was compared), unless the caller turns
the comparison off (`--no-gate`).
"""

from __future__ import annotations

from dnr_deploy.deploydir.manifest import format_classes

TRAINING_SIDE_KEY = "autoattack"  # the manifest figure robust accuracy is compared with


def compare(accuracy: dict, manifest: dict, eps: float, images: int, protocol: dict,
            tolerance: float, min_robust: float | None, gate: bool) -> dict:
    """The gate.

    Args:
        accuracy: the artifact's {"clean", "robust"} as fractions.
        manifest: the deploy dir's manifest ("accuracy", "robustness", "threat_model").
        eps: the radius the artifact was attacked at.
        images: how many of the first test images were attacked.
        protocol: the attack settings that ran (`evaluation.protocol`).
        tolerance: percentage points the artifact may fall below the training side.
        min_robust: absolute floor in percent, or None.
        gate: False: no comparison with the training side (the floor still applies).

    Returns:
        {"passed", "gated", "reasons" (why it failed), "notes", "tolerance_points", ...}.
    """
    result: dict = {"tolerance_points": tolerance, "min_robust_percent": min_robust,
                    "gated": gate, "reasons": [], "notes": []}
    robust_percent = 100 * accuracy["robust"]
    if min_robust is not None and robust_percent < min_robust:
        result["reasons"].append(f"robust accuracy {robust_percent:.2f}% is below the floor "
                                 f"--min-robust {min_robust:g}%")
    if gate:
        _against_training_side(result, accuracy, manifest, eps, images, protocol, tolerance)
    else:
        result["notes"].append("--no-gate: not compared with the training side")
    result["passed"] = not result["reasons"]
    return result


def _against_training_side(result: dict, accuracy: dict, manifest: dict, eps: float,
                           images: int, protocol: dict, tolerance: float) -> None:
    trained = manifest.get("accuracy") or {}
    robustness = manifest.get("robustness") or {}
    reference = trained.get(TRAINING_SIDE_KEY)
    trained_eps = (manifest.get("threat_model") or {}).get("eps")
    if reference is None:
        result["reasons"].append(
            "the manifest records no AutoAttack-grade training-side figure (accuracy.autoattack):"
            " nothing to compare with; re-run dnr-compress and dnr-export with this version, "
            "or pass --no-gate")
        return
    if not isinstance(trained_eps, int | float) or abs(float(trained_eps) - eps) > 1e-9:
        result["reasons"].append(
            f"eps {eps:g} is not the training side's {trained_eps}: the figures are not "
            "comparable; attack at the manifest's eps, or pass --no-gate")
        return
    drop = float(reference) - accuracy["robust"]
    result.update(reference=float(reference), robust_drop_points=100 * drop)
    clean = _clean_reference(trained, robustness, images)
    if clean is not None:
        result["clean_reference"] = clean
        result["clean_drop_points"] = 100 * (clean - accuracy["clean"])
        if result["clean_drop_points"] > tolerance:
            result["reasons"].append(
                f"clean accuracy of the artifact is {result['clean_drop_points']:.2f} points "
                f"below the training side's ({100 * clean:.2f}%, tolerance {tolerance:g})")
    if 100 * drop > tolerance:
        result["reasons"].append(
            f"robust accuracy of the artifact is {100 * drop:.2f} points below the training "
            f"side's AutoAttack-grade figure (tolerance {tolerance:g})")
    recorded_images = robustness.get("images")
    if recorded_images is not None and recorded_images != images:
        result["notes"].append(f"the training side attacked the first {recorded_images} test "
                               f"images, this run the first {images}: the gap includes "
                               "sampling noise")
    recorded = robustness.get("protocol") or {}
    differs = sorted(k for k, v in protocol.items() if k in recorded and recorded[k] != v)
    if differs:
        result["notes"].append(f"the attack settings differ from the training side's "
                               f"({', '.join(differs)}): a weaker attack passes more easily")


def _clean_reference(trained: dict, robustness: dict, images: int) -> float | None:
    """The training side's clean accuracy on the images verify scored: the ensemble's own
    clean figure when it ran on the same first images, else the whole test split's."""
    if isinstance(robustness.get("clean"), int | float) and robustness.get("images") == images:
        return float(robustness["clean"])
    return float(trained["clean"]) if isinstance(trained.get("clean"), int | float) else None


def stage_label(stage: dict) -> str:
    """An ensemble stage as tables name it: "apgd-t", or "transfer apgd-t" when its gradients
    came from an int8 deploy dir's float graph."""
    gradients, attack = stage.get("gradients", "model"), stage.get("attack")
    return f"{attack}" if gradients == "model" else f"{gradients} {attack}"


def scorer_label(report: dict) -> str:
    """Which engine's logits gave the verdicts, for the screen."""
    runtime = report.get("runtime") or {}
    if runtime.get("name") != "sparse":
        return "ONNX Runtime"
    kind = "int8 sparse engine" if runtime.get("dtype") == "int8" else "sparse engine"
    return f"the {kind} ({runtime['kernel']} kernel)"


def format_table(report: dict) -> str:
    """The screen summary: each attack, the worst case, the training side, checks, the gate."""
    acc, trained, comp = report["accuracy"], report["training_side"], report["comparison"]
    images, checks, threat = report["images"], report["checks"], report["threat_model"]
    subset = f"first {images['first']} of {images['of']}" if images["subset"] else \
        f"all {images['of']}"
    lines = [
        f"deploy dir: {report['deploy_dir']} ({report['granularity']})",
        f"  {images['dataset']} test images: {subset}; Linf eps {threat['eps']:.4g} "
        f"({threat['from']}); attack {report['attack']['name']}, scored by {scorer_label(report)}",
        *([f"  {format_classes(images['class_names'])}"] if images.get("class_names") else []),
        f"  {'':<22}{'artifact':>10}{'training side':>15}",
        f"  {'clean':<22}{100 * acc['clean']:>9.2f}%{_percent(trained.get('clean')):>15}",
    ]
    for stage in report["stages"]:
        label = f"after {stage_label(stage)}"
        lines.append(f"  {label:<22}{100 * stage['robust_after']:>9.2f}%"
                     f"{'':>15}  ({stage['broken']} broken, {stage['seconds']:.1f} s)")
    lines.append(f"  {'worst case':<22}{100 * acc['robust']:>9.2f}%"
                 f"{_percent(trained.get('autoattack')):>15}")
    if trained.get("pgd20") is not None:
        lines.append(f"  {'(PGD-20, training side)':<22}{'':>10}{_percent(trained['pgd20']):>15}")
    fidelity = report.get("fidelity") or {}
    check = (f"  checks: max |x_adv - x| {checks['max_perturbation']:.4g} (eps {threat['eps']:.4g})"
             f", pixels in [{checks['pixel_min']:.3g}, {checks['pixel_max']:.3g}]")
    lines.append(check)
    if fidelity:
        lines.append(f"  export fidelity: re-imported graph vs ONNX Runtime max |diff| "
                     f"{max(fidelity['clean_max_abs'], fidelity['adversarial_max_abs']):.2e} "
                     f"(limit {fidelity.get('limit', fidelity['atol']):.3g}): PASS")
    if comp["gated"] and "robust_drop_points" in comp:
        drop = comp["robust_drop_points"]
        side = ("equal to" if abs(drop) < 0.005 else
                f"{drop:.2f} points below" if drop > 0 else f"{-drop:.2f} points above")
        lines.append(f"  gate: worst case {side} the training side's AutoAttack-grade figure "
                     f"(tolerance {comp['tolerance_points']:g})")
    if comp["min_robust_percent"] is not None:
        lines.append(f"  floor: --min-robust {comp['min_robust_percent']:g}%")
    lines.append(f"  verdict: {'PASS' if comp['passed'] else 'FAIL'}")
    lines.extend(f"  reason: {reason}" for reason in comp["reasons"])
    lines.extend(f"  note: {note}" for note in comp["notes"])
    lines.extend(f"  warning: {text}" for text in report.get("warnings", []))
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
