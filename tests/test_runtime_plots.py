"""verify's example grid shows attacks that succeeded and images the model held, labelled."""

import numpy as np

from dnr_deploy.runtime import plots
from dnr_deploy.runtime.verify import _examples


def test_examples_mix_successes_and_failures_of_the_attack():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    pred_clean = y.copy()
    pred_clean[7] = 0  # wrong before any attack
    pred_adv = np.array([9, 9, 9, 9, 9, 5, 6, 0])  # images 0-4 fooled, 5-6 held
    x = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
    picked = _examples(x, x, y, pred_clean, pred_adv, count=4)
    chosen = picked[0].ravel().astype(int).tolist()
    assert chosen == [0, 1, 5, 6]  # two of each, not the first four successes
    only_fooled = _examples(x[:5], x[:5], y[:5], pred_clean[:5], pred_adv[:5], count=4)
    assert only_fooled[0].ravel().astype(int).tolist() == [0, 1, 2, 3]  # fills from the other
    assert _examples(x, x, y, pred_clean, pred_adv, count=0) is None


def test_example_grid_is_written(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 8, 8), dtype=np.float32)
    x_adv = np.clip(x + 0.1, 0, 1)
    path = tmp_path / "examples.png"
    plots.save_examples(path, x, x_adv, np.array([1, 2, 3]), np.array([1, 2, 0]),
                        np.array([4, 2, 0]), eps=0.1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [plots._outcome(1, 1, 4)[0], plots._outcome(2, 2, 2)[0], plots._outcome(3, 0, 0)[0]] \
        == ["ATTACK SUCCEEDED", "model held", "wrong when clean"]
