"""The deploy dir contract: its names (`names`), its manifest (`manifest`: build, write, load,
check every file's sha256) and opening one for bench and verify (`opening`)."""

from dnr_deploy.deploydir.manifest import (
    ManifestError,
    build_manifest,
    load_manifest,
    verify_files,
    write_manifest,
)
from dnr_deploy.deploydir.names import (
    BASELINE_FILE,
    CSR_FILE,
    DEFAULT_OUT,
    FP32_MODEL_FILE,
    HISTORY_FILE,
    INPUT_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    REPORTS_DIR,
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

__all__ = [
    "BASELINE_FILE", "CSR_FILE", "DEFAULT_OUT", "FP32_MODEL_FILE", "HISTORY_FILE", "INPUT_NAME",
    "MANIFEST_NAME", "MODEL_FILE", "OUTPUT_NAME", "REPORTS_DIR", "WEIGHTS_FILE", "DataSource",
    "DeployDir", "DeployDirError", "ManifestError", "SourceRunWarning", "build_manifest",
    "find_dataset",
    "load_manifest", "open_deploy_dir", "reports_dir", "resolve_deploy_dir", "verify_files",
    "write_manifest",
]
