"""Verify's attacks: Square stays in the eps ball and breaks a non-robust model by queries
alone; PGD through the re-imported ONNX graph is as strong as PGD on the PyTorch network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnr_deploy import data  # not `import test_subset`: pytest would collect it
from dnr_deploy.attacks import pgd
from dnr_deploy.attacks.square import margin_loss, p_selection, square_attack
from dnr_deploy.export.onnx import export_onnx
from dnr_deploy.models.registry import Normalize
from dnr_deploy.runtime.onnx_torch import load_onnx_torch
from dnr_deploy.runtime.session import create_session, run_logits
from dnr_deploy.runtime.verify import VerifyCheckFailed, check_perturbation


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear classifier on the digits (about 95% clean, not robust), and 120 test images."""
    torch.manual_seed(0)
    bundle = data.load_data("digits")
    x_train = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    y_train = torch.as_tensor([int(bundle.train[i][1]) for i in range(len(bundle.train))])
    model = nn.Sequential(Normalize([0.3], [0.38]), nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    x, y = data.test_subset(bundle, 120)
    return model.eval(), x, y


def as_query(model: nn.Module):
    def query(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()
    return query


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def test_square_stays_in_the_ball_and_breaks_a_non_robust_model(digits_model):
    model, x, y = digits_model
    query, x_np, y_np = as_query(model), x.numpy(), y.numpy()
    clean = accuracy(query(x_np), y_np)
    result = square_attack(query, x_np, y_np, eps=0.2, n_queries=300, seed=0)
    assert clean > 0.9
    assert np.abs(result.x_adv - x_np).max() <= 0.2 + 1e-6
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    figures = check_perturbation(result.x_adv, x_np, 0.2)
    assert figures["max_perturbation"] <= 0.2 + 1e-6 and figures["in_pixel_range"]
    assert accuracy(query(result.x_adv), y_np) < 0.5 * clean
    assert result.queries.max() <= 300 + 2  # the clean query and the stripe start's
    fooled = result.margin <= 0
    np.testing.assert_array_equal(fooled, query(result.x_adv).argmax(1) != y_np)


def test_square_leaves_misclassified_images_alone_and_is_seeded(digits_model):
    model, x, y = digits_model
    query, x_np = as_query(model), x[:40].numpy()
    wrong = (y[:40].numpy() + 1) % 10  # every label wrong: nothing to attack
    result = square_attack(query, x_np, wrong, eps=0.1, n_queries=50)
    np.testing.assert_array_equal(result.x_adv, x_np)
    assert (result.queries == 1).all()
    first = square_attack(query, x_np, y[:40].numpy(), eps=0.1, n_queries=50, seed=3)
    again = square_attack(query, x_np, y[:40].numpy(), eps=0.1, n_queries=50, seed=3)
    np.testing.assert_array_equal(first.x_adv, again.x_adv)


def test_square_schedule_and_margin():
    """AutoAttack's standard schedule: p halves after iterations 10, 50, ..., 8000, never
    rescaled to the budget (5,000 queries end at p_init / 128)."""
    assert p_selection(0.8, 0) == 0.8
    assert p_selection(0.8, 10) == 0.8
    assert p_selection(0.8, 11) == 0.4
    assert p_selection(0.8, 50) == 0.4
    assert p_selection(0.8, 501) == 0.8 / 16
    assert p_selection(0.8, 4999) == 0.8 / 128
    assert p_selection(0.8, 9999) == 0.8 / 512
    logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(margin_loss(logits, np.array([0, 2])), [1.0, -2.0])


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"eps": 1.5}, {"n_queries": 0},
                                    {"p_init": 0.0}])
def test_square_rejects_bad_arguments(kwargs):
    settings = {"eps": 0.1, "n_queries": 10, **kwargs}
    with pytest.raises(ValueError):
        square_attack(lambda a: np.zeros((len(a), 3)), np.zeros((1, 1, 4, 4), np.float32),
                      np.zeros(1, np.int64), **settings)


def test_perturbation_check_raises_outside_the_ball_or_range():
    x = np.full((2, 1, 4, 4), 0.5, np.float32)
    with pytest.raises(VerifyCheckFailed, match="beyond eps"):
        check_perturbation(x + 0.2, x, 0.1)
    outside = x.copy()
    outside[0, 0, 0, 0] = 1.05
    with pytest.raises(VerifyCheckFailed, match=r"\[0, 1\]"):
        check_perturbation(outside, x, 0.6)


def test_pgd_on_the_reimport_is_as_strong_as_on_the_network(digits_model, tmp_path):
    model, x, y = digits_model
    path = tmp_path / "model.onnx"
    export_onnx(model, x[:1], path, 18)
    graph = load_onnx_torch(str(path))
    session, _ = create_session(path)
    eps, step = 0.05, 0.05 / 4
    torch.manual_seed(0)
    x_net = pgd(model, x, y, eps, step, 20)
    torch.manual_seed(0)
    x_art = pgd(graph, x, y, eps, step, 20)
    y_np = y.numpy()
    with torch.no_grad():
        acc_net = accuracy(model(x_net).numpy(), y_np)
    acc_art = accuracy(run_logits(session, x_art.numpy()), y_np)  # scored by ONNX Runtime
    assert acc_art <= acc_net + 1 / len(y)
    assert acc_art < accuracy(run_logits(session, x.numpy()), y_np)  # it did attack
    assert (x_art - x).abs().max() <= eps + 1e-6


def test_fidelity_limit_grows_with_the_logits():
    """Verify's re-import check allows float32 rounding that grows with the logits (atol +
    rtol x largest |logit|, export's rule), and still stops a real drift."""
    from dnr_deploy.runtime.verify import VerifyConfig, _parity

    x = torch.zeros(4, 3)
    big = np.full((4, 2), 1e8, np.float32)
    config = VerifyConfig()

    def off_by(delta: float):
        return lambda images: torch.from_numpy(big[: len(images)] + np.float32(delta))

    assert _parity(off_by(8.0), x, big, config, "clean", 1e-4)[0] == pytest.approx(8.0)
    with pytest.raises(VerifyCheckFailed, match="largest"):
        _parity(off_by(1e3), x, big, config, "clean", 1e-4)
    with pytest.raises(VerifyCheckFailed):
        _parity(off_by(8.0), x, big, VerifyConfig(parity_rtol=0.0), "clean", 1e-4)
