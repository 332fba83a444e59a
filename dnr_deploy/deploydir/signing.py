"""Signed deploy dirs: the OpenSSF model signing library (`model-signing`), key-based, offline.

The manifest's sha256 table catches damage, not intent: whoever can rewrite a deploy dir can
replace model.onnx and update its hash. A signature made with a private key the attacker does
not hold can't be forged that way. What is signed:

- `dnr-verify --sign KEY`, after the gate passed: every file of the deploy dir (model.onnx,
  the listed files, manifest.json) plus `verify.json`, the verified claim (clean and worst-case
  robust accuracy, eps, the attack and its budget, the gate's verdict). Signing comes last,
  so a failed gate leaves no signature.
- `dnr-export --sign KEY`: the same files without a verify.json. No gate vouches for it,
  and `SignatureStatus.verified` says so.

The signature is `model.sig` inside the deploy dir. It covers every file of the dir except
itself and `reports/` (outputs bench and verify write after signing; no stage loads anything
from there). With `verify_key` a missing signature, a signature from another key, a changed
byte, or a file added or removed after signing is a `SignatureError` (the CLIs exit 2); without
it, one `SignatureNotice` says the dir is unsigned or that its signature was not checked.

model-signing (and sigstore, which it imports) loads only when a key is given: `--help` and
the torch-free paths stay light.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from dnr_deploy.deploydir.manifest import ManifestError
from dnr_deploy.deploydir.names import CLAIM_FILE, REPORTS_DIR, SIGNATURE_FILE
from dnr_deploy.files import write_json

UNSIGNED_PATHS = frozenset({SIGNATURE_FILE, REPORTS_DIR})  # all a signature may leave out
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts
MAX_SIGNATURE_BYTES = 1 << 20  # a bundle over a few files is a few KiB
MAX_KEY_BYTES = 1 << 16


class SignatureError(ManifestError):
    """A signature that is missing, not made with the given key, or does not match the files;
    or a key that cannot sign or verify."""


class SignatureNotice(UserWarning):
    """A deploy dir used without checking a signature (no verify key): unsigned, signed but
    not checked, or signed without a verdict."""


@dataclass(frozen=True)
class SignatureStatus:
    """A signature that verified: the files it covers and the verified claim, if any."""

    files: tuple[str, ...]
    claim: dict | None  # verify.json when the signature covers it

    @property
    def verified(self) -> bool:
        """Signed after a gate that passed (dnr-verify --sign), not just at export."""
        return bool(self.claim and (self.claim.get("comparison") or {}).get("passed") is True)

    def describe(self) -> str:
        if not self.verified:
            return (f"signed without a verdict (dnr-export --sign): the signature covers "
                    f"{len(self.files)} files and no {CLAIM_FILE}")
        claim = self.claim or {}
        accuracy, threat = claim.get("accuracy") or {}, claim.get("threat_model") or {}
        return (f"signed after dnr-verify's gate passed: clean {_pct(accuracy.get('clean'))}, "
                f"worst case {_pct(accuracy.get('robust'))} at Linf eps {threat.get('eps')} "
                f"({(claim.get('attack') or {}).get('name')})")

    def as_dict(self) -> dict:
        return {"checked": True, "verified": self.verified, "files": list(self.files),
                "status": self.describe()}


def check_private_key(private_key: str | Path, deploy_dir: str | Path | None = None) -> Path:
    """The private key file, checked before any work that would end in signing.

    Raises:
        SignatureError: no such file, not an unencrypted PEM elliptic-curve private key on a
            curve model-signing supports, or a key inside the deploy dir it would sign (it
            would be signed and shipped with the model).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(private_key)
    if deploy_dir is not None and path.resolve().is_relative_to(Path(deploy_dir).resolve()):
        raise SignatureError(f"the private key {str(path)!r} is inside the deploy dir it would "
                             "sign: it would ship with the model; keep it outside")
    data = _read_key(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"the private key {str(path)!r} is encrypted; give an unencrypted "
                             "PEM key (e.g. from a CI secret)") from None
    except ValueError:
        raise SignatureError(f"{str(path)!r} is not a PEM private key; make one with openssl "
                             "ecparam -name prime256v1 -genkey -noout -out key.pem") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"the private key {str(path)!r} is not an elliptic-curve key on "
                             f"{', '.join(SUPPORTED_CURVES)} (what model-signing signs with)")
    return path


def sign_deploy_dir(deploy_dir: str | Path, private_key: str | Path) -> Path:
    """Sign every file of `deploy_dir` (but model.sig and reports/) into DEPLOY_DIR/model.sig.

    The signature is written to a temporary name and renamed: a crash leaves the old signature
    (which then no longer matches, and is refused) or the new one.

    Raises:
        SignatureError: a bad key (see `check_private_key`), or a file model-signing refuses
            (a symlink).
    """
    from model_signing import signing

    folder = Path(deploy_dir)
    key = check_private_key(private_key, folder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # hashed below otherwise; model-signing writes it after hashing
        config = signing.Config().set_hashing_config(_hashing())
        config.use_elliptic_key_signer(private_key=key).sign(folder, tmp)
        os.replace(tmp, folder / SIGNATURE_FILE)
    except ValueError as err:  # a symlink in the dir, an unreadable file
        raise SignatureError(f"cannot sign {str(folder)!r}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return folder / SIGNATURE_FILE


def write_claim(deploy_dir: str | Path, report: dict) -> Path:
    """DEPLOY_DIR/verify.json: the report of a verification whose gate passed, to be signed."""
    path = Path(deploy_dir) / CLAIM_FILE
    write_json(path, report)
    return path


def verify_signature(deploy_dir: str | Path, public_key: str | Path) -> SignatureStatus:
    """Check DEPLOY_DIR/model.sig with `public_key` against every file of the dir.

    Raises:
        SignatureError: no signature, one from another key or unreadable, a signature that
            leaves files other than model.sig and reports/ unsigned, or any file changed,
            added or removed after signing (named in the message).
    """
    folder = Path(deploy_dir)
    key = _check_public_key(Path(public_key))
    file = folder / SIGNATURE_FILE
    if file.is_symlink() or not file.is_file():
        raise SignatureError(f"{str(folder)!r} has no signature ({SIGNATURE_FILE}) and "
                             f"--verify-key was given: refused")
    if file.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{str(file)!r} is larger than any signature ({MAX_SIGNATURE_BYTES} "
                             "bytes): refused")
    data = file.read_bytes()  # verified and parsed from these same bytes
    resources = _signed_resources(data, file)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / SIGNATURE_FILE
        copy.write_bytes(data)
        _verify(folder, copy, key, resources)
    claim = None
    if CLAIM_FILE in resources:
        from dnr_deploy.files import read_json_object

        claim = read_json_object(folder / CLAIM_FILE, "a verify.json", SignatureError)
    return SignatureStatus(tuple(sorted(resources)), claim)


def check_signature(deploy_dir: str | Path, verify_key: str | Path | None) -> dict:
    """The signature policy every stage applies before it loads anything from a deploy dir.

    With `verify_key`: `verify_signature` (refusing on any failure); a signature without a
    verdict also gets one notice. Without: one `SignatureNotice` saying the dir is unsigned or
    that its signature was not checked.

    Returns:
        What was found, for reports: {"checked", "verified", "status", ...}.

    Raises:
        SignatureError: see `verify_signature`.
    """
    folder = Path(deploy_dir)
    if verify_key is not None:
        status = verify_signature(folder, verify_key)
        if not status.verified:
            _notice(f"{str(folder)!r} is {status.describe()}")
        return status.as_dict()
    if (folder / SIGNATURE_FILE).exists():
        text = f"{str(folder)!r} is signed but the signature was not checked: pass --verify-key"
    else:
        text = (f"{str(folder)!r} is unsigned: its sha256 table catches damage, not a swapped "
                "model; sign with dnr-verify --sign KEY, check with --verify-key PUB")
    _notice(text)
    return {"checked": False, "verified": False, "status": text}


def checked_manifest(deploy_dir: str | Path, verify_key: str | Path | None, required: str,
                     not_this_kind) -> dict:
    """The manifest of a deploy dir a runtime is about to parse, with the checks every runtime
    makes first: with `verify_key` its signature; `required` listed in its files (else
    `not_this_kind(manifest)` is raised: the error that names what the dir is instead); every
    file's sha256; without `verify_key`, one notice that the signature was not checked.

    Raises:
        ManifestError: not a deploy dir, a file that fails its sha256, or (SignatureError)
            with `verify_key`, no valid signature.
    """
    from dnr_deploy.deploydir.manifest import load_manifest, verify_files

    folder = Path(deploy_dir)
    if verify_key is not None:
        check_signature(folder, verify_key)
    info = load_manifest(folder)
    files = info.get("files")
    if not isinstance(files, dict) or required not in files:
        raise not_this_kind(info)
    verify_files(folder, info)
    if verify_key is None:
        check_signature(folder, None)
    return info


def _notice(text: str) -> None:
    warnings.warn(text, SignatureNotice, stacklevel=4)


def _hashing():
    """What is signed: every file but model.sig and reports/, git files included (a .git
    folder dropped into a deploy dir is an added file like any other), no symlinks."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=sorted(UNSIGNED_PATHS),
                                              ignore_git_paths=False)


def _read_key(path: Path, kind: str) -> bytes:
    if not path.is_file():
        raise SignatureError(f"no {kind} key file {str(path)!r}")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise SignatureError(f"{str(path)!r} is too large to be a PEM {kind} key")
    try:
        return path.read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read the {kind} key {str(path)!r}: {err.strerror}") \
            from None


def _check_public_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{str(path)!r} is not a PEM public key; make one with openssl ec "
                             "-in key.pem -pubout -out pub.pem") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"the public key {str(path)!r} is not an elliptic-curve key on "
                             f"{', '.join(SUPPORTED_CURVES)}")
    return path


def _signed_resources(data: bytes, file: Path) -> dict[str, str]:
    """{file name: digest} of the signed statement (read before its signature is checked:
    only used once `_verify` has checked it), and a check that it leaves nothing else out."""
    try:
        bundle = json.loads(data)
        if not bundle["verificationMaterial"]["publicKey"]["hint"]:
            raise ValueError("no key hint")  # model-signing would print to stdout and go on
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        predicate = statement["predicate"]
        ignored = set(predicate["serialization"].get("ignore_paths", []))
        resources = {str(r["name"]): str(r["digest"]) for r in predicate["resources"]}
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, RecursionError):
        raise SignatureError(f"{str(file)!r} is not a model-signing signature: refused") \
            from None
    if not ignored <= UNSIGNED_PATHS:
        extra = ", ".join(sorted(map(str, ignored - UNSIGNED_PATHS)))
        raise SignatureError(f"{str(file)!r} leaves {extra} unsigned; only {SIGNATURE_FILE} and "
                             f"{REPORTS_DIR}/ may be: re-sign with dnr-verify --sign")
    return resources


def _verify(folder: Path, signature: Path, key: Path, resources: dict[str, str]) -> None:
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    config = verifying.Config().set_hashing_config(_hashing())
    try:
        config.use_elliptic_key_verifier(public_key=key).verify(folder, signature)
    except InvalidSignature:
        raise SignatureError(f"{str(folder / SIGNATURE_FILE)!r} was not made with the private "
                             f"key of {str(key)!r} (or was altered): refused") from None
    except ValueError as err:
        text = str(err)
        if text.startswith("Key mismatch"):
            raise SignatureError(f"{str(folder / SIGNATURE_FILE)!r} was made with another key "
                                 f"than the one of {str(key)!r}: refused") from None
        if text.startswith("Signature mismatch"):
            raise SignatureError(f"{str(folder)!r}: {_difference(folder, resources)}: refused") \
                from None
        raise SignatureError(f"cannot check the signature of {str(folder)!r}: "
                             f"{' '.join(text.split())[:200]}") from None
    except OSError as err:
        raise SignatureError(f"cannot read {str(folder)!r} to check its signature: "
                             f"{err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 (a hostile bundle: any parse error is a refusal)
        raise SignatureError(f"{str(folder / SIGNATURE_FILE)!r} cannot be read as a "
                             f"model-signing signature ({type(err).__name__}): refused") from None


def _difference(folder: Path, signed: dict[str, str]) -> str:
    """What changed since signing, in one phrase (hashes the dir again; only on a mismatch)."""
    actual = {rd.identifier: rd.digest.digest_hex
              for rd in _hashing().hash(folder).resource_descriptors()}
    parts = []
    changed = sorted(n for n in signed.keys() & actual.keys() if signed[n] != actual[n])
    if changed:
        parts.append(f"{', '.join(changed)} changed after signing")
    if actual.keys() - signed.keys():
        parts.append(f"{', '.join(sorted(actual.keys() - signed.keys()))} added after signing")
    if signed.keys() - actual.keys():
        parts.append(f"{', '.join(sorted(signed.keys() - actual.keys()))} removed after signing")
    return "; ".join(parts) or "the files do not match the signature"


def _pct(value: object) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "?"
