"""A deploy dir whose files no longer match the manifest is refused before anything loads."""

from __future__ import annotations

import shutil

import pytest

from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.deploydir.opening import REPORTS_DIR, open_deploy_dir
from runtime_tests.helpers import assert_refused, run_cli


@pytest.fixture
def copy(deploy, tmp_path):
    target = tmp_path / "deploy"
    shutil.copytree(deploy.path, target, ignore=shutil.ignore_patterns(REPORTS_DIR))
    return target


def flip_a_byte(path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_each_tampered_file_is_named(deploy, copy):
    for name in deploy.manifest["files"]:
        original = (copy / name).read_bytes()
        flip_a_byte(copy / name)
        with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
            open_deploy_dir(copy)
        (copy / name).write_bytes(original)
    open_deploy_dir(copy)  # restored: accepted again


def test_bench_and_verify_refuse_a_tampered_model(copy):
    flip_a_byte(copy / "model.onnx")
    for stage in ("bench", "verify"):
        result = run_cli([stage, str(copy)], cwd=copy.parent)
        assert_refused(result, 2)
        assert "sha256" in result.stderr
