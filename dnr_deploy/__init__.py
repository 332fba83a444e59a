"""dnr-deploy: robust pruning by Dynamic Network Rewiring, and verified deployment of the result.

`dnr_deploy.compress(CompressConfig(...))` does exactly what `dnr-compress` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dnr_deploy.trainer import compress
    from dnr_deploy.training import CompressConfig, Run

__version__ = "0.1.0"

__all__ = ["CompressConfig", "Run", "__version__", "compress"]

# Resolved on first use (PEP 562), so that `import dnr_deploy.summary` or a CLI's `--help` does
# not pay for importing torch.
_LAZY = {"compress": "dnr_deploy.trainer", "CompressConfig": "dnr_deploy.training",
         "Run": "dnr_deploy.training"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dnr_deploy' has no attribute {name!r}")
