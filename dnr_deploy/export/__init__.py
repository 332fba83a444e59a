"""Turning a run into deployable artifacts: shrunk or CSR weights, ONNX, and a manifest.

    source.py    the masked training network of a finished run (what export must reproduce)
    channel.py   physical removal of off channel units (torch-pruning), history + state storage
    csr.py       the CSR bundle of an irregular run (weights.csr.npz)
    onnx.py      ONNX export with a dynamic batch, sparse initializers, parity
    deploy.py    export_run(ExportConfig) -> DeployResult (what dnr-export runs)
    loader.py    load_deployed_model(deploy_dir) -> nn.Module

The deploy dir's names and manifest live in `dnr_deploy.deploydir`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dnr_deploy.export.config import ExportConfig, ExportFormat
    from dnr_deploy.export.deploy import DeployResult, export_run
    from dnr_deploy.export.errors import ExportCheckFailed, ExportError
    from dnr_deploy.export.loader import load_deployed_model
    from dnr_deploy.export.source import SourceRun, load_source

__all__ = ["DeployResult", "ExportCheckFailed", "ExportConfig", "ExportError", "ExportFormat",
           "SourceRun", "export_run", "load_deployed_model", "load_source"]

# Resolved on first use (PEP 562): `dnr-export --help` imports export/config.py, a module of
# this package, and must not pay for torch through the names below.
_LAZY = {"ExportConfig": "config", "ExportFormat": "config", "DeployResult": "deploy",
         "export_run": "deploy", "ExportCheckFailed": "errors", "ExportError": "errors",
         "load_deployed_model": "loader", "SourceRun": "source", "load_source": "source"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"dnr_deploy.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dnr_deploy.export' has no attribute {name!r}")
