"""PGD stays in the eps ball and in [0, 1], and gets stronger with more steps."""

import torch
import torch.nn.functional as F

from dnr_deploy.attacks import fgsm, pgd
from dnr_deploy.models import create_model


def model_and_batch():
    torch.manual_seed(0)
    model = create_model("small", 10, 1, [0.3], [0.4]).eval()
    return model, torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))


def test_pgd_stays_inside_eps_ball_and_pixel_range():
    model, x, y = model_and_batch()
    x[:4] = 0.0  # at the edges of [0, 1] the clip must act
    x[4:8] = 1.0
    for eps in (0.03, 0.2):
        x_adv = pgd(model, x, y, eps=eps, step_size=eps / 2, steps=10)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert (x_adv - x).abs().max() > eps / 2  # it did move
    x_fgsm = fgsm(model, x, y, 0.1)
    assert (x_fgsm - x).abs().max() <= 0.1 + 1e-6


def test_pgd_loss_rises_with_steps():
    model, x, y = model_and_batch()
    losses = []
    for steps in (0, 1, 5, 20):
        torch.manual_seed(1)
        x_adv = pgd(model, x, y, eps=0.2, step_size=0.05, steps=steps, random_start=False)
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x_adv), y).item())
    assert losses[0] < losses[1] < losses[2] <= losses[3] + 1e-6, losses


def test_pgd_leaves_model_mode_and_parameter_grads_alone():
    model, x, y = model_and_batch()
    model.train()
    pgd(model, x, y, eps=0.1, step_size=0.05, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_square_reports_progress_while_images_resist():
    """A long Square run is not silent: a line every 250 iterations while images are left."""
    import numpy as np

    from dnr_deploy.attacks.square import square_attack

    def stubborn(images: np.ndarray) -> np.ndarray:  # class 0 always wins by far
        logits = np.zeros((len(images), 3), np.float32)
        logits[:, 0] = 100.0
        return logits

    lines: list[str] = []
    x = np.full((2, 1, 4, 4), 0.5, np.float32)
    square_attack(stubborn, x, np.zeros(2, np.int64), 0.1, n_queries=600, progress=lines.append)
    assert lines == ["250/600 iterations, 2/2 images left", "500/600 iterations, 2/2 images left"]
