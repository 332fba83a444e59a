"""verify's verdict: the gate against the training-side figures, and the table on screen.

The training side (the manifest's "accuracy", from dnr-compress's final evaluation) is PGD-20 at
step eps/4 with a random start on the run's whole test split. The gate compares the artifact's
robust accuracy with that figure at the same eps and fails when it is lower by more than the
tolerance; at another eps the figures are not comparable and no gate applies.
"""

from __future__ import annotations

TRAINING_SIDE_KEY = "pgd20"  # the manifest figure robust accuracy is compared with


def compare(accuracy: dict, manifest: dict, eps: float, tolerance: float, notes: list[str]
            ) -> dict:
    """The gate: robust accuracy may fall at most `tolerance` points below the training side.

    Args:
        accuracy: the artifact's {"clean", "robust"} as fractions.
        manifest: the deploy dir's manifest (its "accuracy" and "threat_model").
        eps: the radius the artifact was attacked at.
        tolerance: percentage points.
        notes: what the reader should know about the comparison (subset, attack), kept.
    """
    trained = manifest.get("accuracy") or {}
    reference = trained.get(TRAINING_SIDE_KEY)
    trained_eps = (manifest.get("threat_model") or {}).get("eps")
    result = {"tolerance_points": tolerance, "passed": True, "gated": False, "notes": notes}
    if reference is None:
        result["notes"] = ["the manifest has no training-side pgd20 figure: nothing to gate"]
        return result
    if not isinstance(trained_eps, int | float) or abs(float(trained_eps) - eps) > 1e-9:
        result["notes"] = [f"eps {eps:g} differs from the training side's {trained_eps}: "
                           "figures not comparable, gate not applied"]
        return result
    drop = (float(reference) - accuracy["robust"]) * 100
    result.update(gated=True, robust_drop_points=drop, passed=drop <= tolerance)
    if trained.get("clean") is not None:
        result["clean_drop_points"] = (float(trained["clean"]) - accuracy["clean"]) * 100
    return result


def format_table(report: dict) -> str:
    """The screen summary: artifact vs training side, the checks, the gate."""
    acc, trained, comp = report["accuracy"], report["training_side"], report["comparison"]
    attack, images, checks = report["attack"], report["images"], report["checks"]
    name = (f"PGD-{attack['steps']} (step {attack['step_size']:.4g})" if attack["name"] == "pgd"
            else f"Square ({attack['queries']} queries, mean used {attack['mean_queries']:.0f})")
    subset = f"first {images['first']} of {images['of']}" if images["subset"] else \
        f"all {images['of']}"
    threat = report["threat_model"]
    lines = [
        f"deploy dir: {report['deploy_dir']} ({report['granularity']})",
        f"  {images['dataset']} test images: {subset}; Linf eps {threat['eps']:.4g} "
        f"({threat['from']}); attack {name}, scored by ONNX Runtime",
        f"  {'':<10}{'artifact':>10}{'training side':>15}{'difference':>13}",
    ]
    for key, label, ref in (("clean", "clean", trained["clean"]),
                            ("robust", attack["name"], trained["robust"])):
        diff = f"{(acc[key] - ref) * 100:+.2f} pt" if ref is not None else "-"
        ref_text = f"{ref:.4f}" if ref is not None else "-"
        lines.append(f"  {label:<10}{acc[key]:>10.4f}{ref_text:>15}{diff:>13}")
    check = f"  checks: max |x_adv - x| {checks['max_perturbation']:.4g} <= eps, pixels in [0, 1]"
    if "reimport_vs_ort_max_abs_clean" in checks:
        drift = max(checks["reimport_vs_ort_max_abs_clean"],
                    checks["reimport_vs_ort_max_abs_adversarial"])
        check += f"; re-imported graph vs ONNX Runtime max |diff| {drift:.2e}"
    lines.append(check)
    if comp["gated"]:
        drop = comp["robust_drop_points"]
        side = ("equal to" if abs(drop) < 0.005 else
                f"{drop:.2f} points below" if drop > 0 else f"{-drop:.2f} points above")
        verdict = "PASS" if comp["passed"] else "FAIL"
        lines.append(f"  gate: robust accuracy {side} the training side's {trained['attack']} "
                     f"(tolerance {comp['tolerance_points']:g} below): {verdict}")
    lines.extend(f"  note: {note}" for note in comp["notes"])
    lines.extend(f"  warning: {text}" for text in report.get("warnings", []))
    return "\n".join(lines)
