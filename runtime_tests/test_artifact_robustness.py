"""verify's ensemble on the artifact is at least as strong as PGD-20 on the PyTorch weights,
and agrees with the training side's AutoAttack-grade figure on the same images."""

from __future__ import annotations

import torch

from dnr_deploy.attacks import AttackName
from dnr_deploy.compress.evaluation import evaluate, final_attacks
from dnr_deploy.export import load_deployed_model
from dnr_deploy.runtime.verify import VerifyConfig, verify

BATCH = 256  # evaluate()'s batch: with the same seed, both PGDs draw the same random starts
SLACK = 0.01  # one percentage point, verify's default tolerance


def test_verify_ensemble_at_least_as_strong_as_pgd20(request, deploy, test_images, tmp_path):
    x, y, total = test_images
    config = VerifyConfig(deploy_dir=str(deploy.path), dataset=request.config.getoption(
        "--dataset"), data_dir=request.config.getoption("--data-dir"), n=len(x),
        batch_size=BATCH, out=str(tmp_path), seed=0, no_gate=True)
    report = verify(config).report
    eps = report["threat_model"]["eps"]
    assert report["attack"]["name"] == AttackName.AUTOATTACK.value
    assert report["checks"]["max_perturbation"] <= eps + 1e-6
    assert report["checks"]["in_pixel_range"]
    assert report["fidelity"]["clean_max_abs"] <= 1e-4

    # PGD-20 by the training code's own evaluation on the PyTorch network
    model = load_deployed_model(deploy.path)
    torch.manual_seed(0)
    pgd20 = {"pgd20": final_attacks(eps, eps / 4)["pgd20"]}
    training_side = evaluate(model, x, y, pgd20, torch.device("cpu"), batch_size=BATCH)
    assert abs(report["accuracy"]["clean"] - training_side["clean"]) <= 1.01 / len(x)
    assert report["accuracy"]["robust"] <= training_side["pgd20"] + SLACK
    recorded = (deploy.manifest.get("robustness") or {}).get("images")
    if recorded == len(x) and "autoattack" in deploy.manifest["accuracy"]:
        # the same ensemble on the same images: the artifact matches the training side
        assert abs(report["accuracy"]["robust"]
                   - deploy.manifest["accuracy"]["autoattack"]) <= SLACK
    assert total >= len(x)
