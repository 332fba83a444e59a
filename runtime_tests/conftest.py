"""The runtime suite's options and its deploy dir: `--deploy-dir` names one (a user's own
artifacts); without it, one is built from the embedded default (dnr-compress --epochs 3, then
dnr-export --baseline) in a temporary folder. The suite never writes into a given deploy dir:
reports go to temporary folders and tampering happens on a copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dnr_deploy.deploydir.opening import DeployDir, find_dataset, open_deploy_dir
from runtime_tests.helpers import run_cli

DEFAULT_EPOCHS = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dnr-deploy runtime")
    group.addoption("--deploy-dir", default=None,
                    help="deploy dir to test (default: build one from the embedded default)")
    group.addoption("--dataset", default=None,
                    help="dataset of the test split (default: the source run's)")
    group.addoption("--data-dir", default=None,
                    help="folder holding the dataset (default: the source run's)")
    group.addoption("--n", type=int, default=None,
                    help="score the first N test images (default: the whole test split)")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def deploy_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = request.config.getoption("--deploy-dir")
    if given:
        return Path(given)
    work = tmp_path_factory.mktemp("embedded_default")
    for args in (["compress", "--epochs", str(DEFAULT_EPOCHS), "--out", "run"],
                 ["export", "run", "--baseline"]):
        result = run_cli(args, cwd=work)
        if result.returncode != 0:
            pytest.fail(f"building the default deploy dir failed: dnr-{' '.join(args)}: "
                        f"{result.stderr.strip()[-500:]}")
    return work / "run" / "deploy"


@pytest.fixture(scope="session")
def deploy(deploy_dir: Path) -> DeployDir:
    """The deploy dir, every listed file checked against its sha256."""
    return open_deploy_dir(deploy_dir)


@pytest.fixture(scope="session")
def test_images(request: pytest.FixtureRequest, deploy: DeployDir):
    """(x, y, size of the whole test split) of the deploy dir's dataset."""
    from dnr_deploy import data

    source = find_dataset(deploy, request.config.getoption("--dataset"),
                          request.config.getoption("--data-dir"))
    bundle = source.load(deploy.manifest)
    x, y = data.test_subset(bundle, request.config.getoption("--n"))
    return x, y, len(bundle.test)
