"""The deploy dir contract: its names (`names`), its manifest (`manifest`: build, write, load,
check every file's sha256), its signature (`signing`: model-signing, key-based) and opening one
for bench and verify (`opening`)."""

from dnr_deploy.deploydir.manifest import (
    ManifestError,
    build_manifest,
    load_manifest,
    verify_files,
    write_manifest,
)
from dnr_deploy.deploydir.names import (
    BASELINE_FILE,
    CLAIM_FILE,
    CSR_FILE,
    DEFAULT_OUT,
    FP32_MODEL_FILE,
    HISTORY_FILE,
    INPUT_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    REPORTS_DIR,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
)
from dnr_deploy.deploydir.opening import (
    DataSource,
    DeployDir,
    DeployDirError,
    SourceRunWarning,
    find_dataset,
    open_deploy_dir,
    reports_dir,
    resolve_deploy_dir,
)
from dnr_deploy.deploydir.signing import (
    SignatureError,
    SignatureNotice,
    check_signature,
    sign_deploy_dir,
    verify_signature,
)

__all__ = [
    "BASELINE_FILE", "CLAIM_FILE", "CSR_FILE", "DEFAULT_OUT", "FP32_MODEL_FILE", "HISTORY_FILE",
    "INPUT_NAME", "MANIFEST_NAME", "MODEL_FILE", "OUTPUT_NAME", "REPORTS_DIR", "SIGNATURE_FILE",
    "WEIGHTS_FILE", "DataSource", "DeployDir", "DeployDirError", "ManifestError",
    "SignatureError", "SignatureNotice", "SourceRunWarning", "build_manifest", "check_signature",
    "find_dataset", "load_manifest", "open_deploy_dir", "reports_dir", "resolve_deploy_dir",
    "sign_deploy_dir", "verify_files", "verify_signature", "write_manifest",
]
