"""dnr-deploy: robust pruning by Dynamic Network Rewiring, and verified deployment of the result.

`dnr_deploy.compress(CompressConfig(...))` does exactly what `dnr-compress` does, and
`dnr_deploy.export_run(ExportConfig(...))` what `dnr-export` does, `dnr_deploy.verify(
VerifyConfig(...))` what `dnr-verify` does; compress and export also take a module (`model=`),
and all three take datasets (README, "Your own model and data").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dnr_deploy.compress.trainer import compress  # (the package is callable as this)
    from dnr_deploy.compress.training import CompressConfig, Run
    from dnr_deploy.export import ExportConfig, export_run
    from dnr_deploy.runtime.verify import VerifyConfig, verify

__version__ = "0.1.0"

__all__ = ["CompressConfig", "ExportConfig", "Run", "VerifyConfig", "__version__", "compress",
           "export_run", "verify"]

# Resolved on first use (PEP 562), so that `import dnr_deploy.report` or a CLI's `--help` does
# not pay for importing torch.
_LAZY = {"CompressConfig": "dnr_deploy.compress.config",
         "Run": "dnr_deploy.compress.training", "export_run": "dnr_deploy.export",
         "ExportConfig": "dnr_deploy.export", "verify": "dnr_deploy.runtime.verify",
         "VerifyConfig": "dnr_deploy.runtime.verify_config"}


def __getattr__(name: str):
    if name == "compress":  # the package dnr_deploy/compress/, callable as trainer.compress
        return importlib.import_module("dnr_deploy.compress")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dnr_deploy' has no attribute {name!r}")
