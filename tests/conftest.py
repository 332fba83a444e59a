"""Shared fixtures: keep every test on one thread for repeatable figures on a 2-core CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.set_num_threads(1)
