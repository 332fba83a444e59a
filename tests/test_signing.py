"""Signed deploy dirs (dnr_deploy/deploydir/signing.py): a dir signed after a passed gate
verifies; any byte changed, a file added or removed, the signature missing or from another key
is refused with one line and exit code 2; without --verify-key one notice line, and the stage
runs; a failed gate signs nothing. Keys are made here with `cryptography` (EC P-256, PEM)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dnr_deploy.cli import bench_main, report_main, verify_main
from dnr_deploy.deploydir import signing
from dnr_deploy.deploydir.names import CLAIM_FILE, REPORTS_DIR, SIGNATURE_FILE
from tests.factories import make_deploy_dir, tiny_graph
from tests.reliability_support import assert_clean_error, call_main, rehash

QUICK_ATTACK = ["--n", "8", "--steps", "1", "--queries", "10"]
BENCH = ["--runs", "2", "--warmup", "0", "--batch", "1"]


def write_keys(folder: Path, name: str) -> tuple:
    """(private key PEM, public key PEM) files, as `openssl ecparam -genkey` and
    `openssl ec -pubout` would write them."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    (key, pub), (_, other_pub) = write_keys(folder, "key"), write_keys(folder, "other")
    return {"key": key, "pub": pub, "other_pub": other_pub}


@pytest.fixture(scope="module")
def signed_dir(tmp_path_factory, keys) -> Path:
    """A deploy dir whose gate passed under `dnr-verify --sign` (the tiny graph: its
    training-side figure is 0%, so the gate passes), its source run then removed so it stands
    alone as a copied deploy dir does."""
    deploy = make_deploy_dir(tmp_path_factory.mktemp("signed") / "deploy")
    outcome = call_main(verify_main, [str(deploy), *QUICK_ATTACK, "--sign", str(keys["key"])])
    assert outcome.code == 0, outcome.err
    assert "signed: " in outcome.out
    shutil.rmtree(deploy.parent / f"{deploy.name}_run")
    return deploy


@pytest.fixture()
def copy(signed_dir, tmp_path) -> Path:
    return Path(shutil.copytree(signed_dir, tmp_path / "deploy"))


def refusal(main, deploy: Path, key: Path, extra: list[str] = ()) -> str:
    """The one error line of `main` run on `deploy` with --verify-key `key` (exit code 2)."""
    outcome = call_main(main, [str(deploy), "--verify-key", str(key), *extra])
    prog = {bench_main: "dnr-bench", report_main: "dnr-report", verify_main: "dnr-verify"}[main]
    return assert_clean_error(outcome.code, outcome.err, prog)


def test_the_verified_claim_is_inside_the_signature(signed_dir, keys):
    status = signing.verify_signature(signed_dir, keys["pub"])
    assert CLAIM_FILE in status.files and "model.onnx" in status.files
    assert "manifest.json" in status.files and "baseline.onnx" in status.files
    assert SIGNATURE_FILE not in status.files and not any(f.startswith(REPORTS_DIR)
                                                         for f in status.files)
    assert status.verified
    claim = status.claim
    assert claim["comparison"]["passed"] is True
    for figure in ("clean", "robust"):
        assert 0 <= claim["accuracy"][figure] <= 1
    assert claim["threat_model"]["eps"] == 0.2
    assert claim["attack"]["apgd_steps"] == 1 and claim["attack"]["square_queries"] == 10


def test_a_signed_dir_runs_with_its_key_and_says_nothing(copy, keys):
    outcome = call_main(bench_main, [str(copy), "--verify-key", str(keys["pub"]), *BENCH])
    assert outcome.code == 0, outcome.err
    assert outcome.err.strip() == ""
    assert json.loads((copy / REPORTS_DIR / "bench.json").read_text())["signature"]["verified"]
    report = call_main(report_main, [str(copy), "--verify-key", str(keys["pub"])])
    assert report.code == 0, report.err
    assert "signed after dnr-verify's gate passed" in report.out
    # reports/ (bench.json, report.html just written) is outside the signature: still valid
    signing.verify_signature(copy, keys["pub"])


@pytest.mark.parametrize(("name", "main"), [("model.onnx", bench_main),
                                            ("manifest.json", report_main),
                                            (CLAIM_FILE, bench_main),
                                            ("baseline.onnx", report_main)])
def test_one_byte_changed_after_signing_is_refused(name, main, copy, keys):
    content = bytearray((copy / name).read_bytes())
    content[len(content) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(content))
    line = refusal(main, copy, keys["pub"], BENCH if main is bench_main else [])
    assert f"{name} changed after signing" in line
    assert not (copy / REPORTS_DIR / "bench.json").exists()


def test_a_forged_model_with_a_matching_manifest_passes_sha256_but_not_the_signature(copy, keys):
    """The attack the manifest cannot catch: a new model.onnx and its sha256 rewritten."""
    (copy / "model.onnx").write_bytes(tiny_graph(7).SerializeToString())
    rehash(copy, "model.onnx")
    unchecked = call_main(bench_main, [str(copy), *BENCH])
    assert unchecked.code == 0, unchecked.err  # what the manifest alone lets through
    line = refusal(bench_main, copy, keys["pub"], BENCH)
    assert "model.onnx changed after signing" in line and "manifest.json" in line


@pytest.mark.parametrize("where", ["extra.onnx", ".git/config"])
def test_a_file_added_after_signing_is_refused(where, copy, keys):
    (copy / where).parent.mkdir(exist_ok=True)
    (copy / where).write_bytes(b"x")
    line = refusal(report_main, copy, keys["pub"])
    assert f"{where} added after signing" in line


def test_a_symlink_added_after_signing_is_refused(copy, keys, tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (copy / "linked.onnx").symlink_to(tmp_path / "outside.onnx")
    assert "symlink" in refusal(report_main, copy, keys["pub"])


def test_a_file_removed_after_signing_is_refused(copy, keys):
    (copy / "baseline.onnx").unlink()
    assert "baseline.onnx removed after signing" in refusal(report_main, copy, keys["pub"])


def test_a_missing_signature_is_refused_with_a_key(copy, keys):
    (copy / SIGNATURE_FILE).unlink()
    line = refusal(bench_main, copy, keys["pub"], BENCH)
    assert "no signature" in line


def test_another_key_is_refused(copy, keys):
    assert "another key" in refusal(verify_main, copy, keys["other_pub"],
                                    ["--dataset", "digits", *QUICK_ATTACK])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_signature_is_refused(damage, copy, keys):
    sig = copy / SIGNATURE_FILE
    sig.write_bytes(b"\x00not json" if damage == "garbage" else sig.read_bytes()[:200])
    assert "not a model-signing signature" in refusal(report_main, copy, keys["pub"])


def test_a_signature_that_leaves_files_unsigned_is_refused(copy, keys):
    """Signed with the model_signing API directly, ignoring a file: not our contract."""
    from model_signing import hashing
    from model_signing import signing as ms_signing

    (copy / "notes.txt").write_text("unsigned")
    config = hashing.Config().set_ignored_paths(
        paths=[SIGNATURE_FILE, REPORTS_DIR, "notes.txt"], ignore_git_paths=False)
    ms_signing.Config().set_hashing_config(config).use_elliptic_key_signer(
        private_key=keys["key"]).sign(copy, copy / SIGNATURE_FILE)
    assert "leaves notes.txt unsigned" in refusal(report_main, copy, keys["pub"])


@pytest.mark.parametrize(("signed", "expected"), [(True, "not checked"), (False, "unsigned")])
def test_without_a_key_one_notice_line_and_it_runs(signed, expected, copy):
    if not signed:
        (copy / SIGNATURE_FILE).unlink()
    outcome = call_main(bench_main, [str(copy), *BENCH])
    assert outcome.code == 0, outcome.err
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dnr-bench: note: ")
    assert expected in lines[0]


def test_a_failed_gate_signs_nothing(tmp_path, keys):
    deploy = make_deploy_dir(tmp_path / "deploy", robust=1.0)  # a claim it cannot meet
    outcome = call_main(verify_main, [str(deploy), *QUICK_ATTACK, "--sign", str(keys["key"])])
    assert outcome.code == 1, outcome.err
    assert not (deploy / SIGNATURE_FILE).exists() and not (deploy / CLAIM_FILE).exists()


@pytest.mark.parametrize("bad", ["missing", "public", "rsa", "inside"])
def test_a_bad_signing_key_fails_before_the_attack(bad, tmp_path, keys):
    from cryptography.hazmat.primitives.asymmetric import rsa

    deploy = make_deploy_dir(tmp_path / "deploy")
    key = {"missing": tmp_path / "nope.pem", "public": keys["pub"],
           "rsa": tmp_path / "rsa.pem", "inside": deploy / "key.pem"}[bad]
    if bad == "rsa":
        key.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    if bad == "inside":
        shutil.copyfile(keys["key"], key)
    outcome = call_main(verify_main, [str(deploy), *QUICK_ATTACK, "--sign", str(key)])
    assert_clean_error(outcome.code, outcome.err, "dnr-verify")
    assert not (deploy / REPORTS_DIR).exists() and not (deploy / SIGNATURE_FILE).exists()


@pytest.mark.slow
@pytest.mark.ci  # the one test of export --sign and of the loaders' verify_key
def test_export_signs_without_a_verdict_and_the_loaders_check_it(tmp_path, keys):
    """dnr-export --sign: signed, but no verify.json (unverified); load_deployed_model and
    load_sparse take verify_key and refuse a changed weight file."""
    import warnings

    from dnr_deploy.cli import export_main
    from dnr_deploy.deploydir.manifest import ManifestError
    from dnr_deploy.export import load_deployed_model
    from dnr_deploy.runtime.sparse import load_sparse
    from tests.factories import write_fake_run

    write_fake_run(tmp_path / "run", "irregular")
    deploy = tmp_path / "deploy"
    outcome = call_main(export_main, [str(tmp_path / "run"), "--out", str(deploy),
                                      "--parity-samples", "16", "--sign", str(keys["key"])],
                        seconds=300)
    assert outcome.code == 0, outcome.err
    status = signing.verify_signature(deploy, keys["pub"])
    assert not status.verified and CLAIM_FILE not in status.files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_deployed_model(deploy, verify_key=keys["pub"])
        load_sparse(deploy, verify_key=keys["pub"])
    notices = {str(w.message) for w in caught if w.category is signing.SignatureNotice}
    assert len(notices) == 1 and "without a verdict" in notices.pop()
    with pytest.warns(signing.SignatureNotice, match="not checked"):
        load_deployed_model(deploy)
    content = bytearray((deploy / "weights.csr.npz").read_bytes())
    content[-10] ^= 0x01
    (deploy / "weights.csr.npz").write_bytes(bytes(content))
    for load in (load_deployed_model, load_sparse):
        with pytest.raises(ManifestError, match="weights.csr.npz changed after signing"):
            load(deploy, verify_key=keys["pub"])
