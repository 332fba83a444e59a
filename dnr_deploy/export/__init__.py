"""Turning a run into deployable artifacts: shrunk or CSR weights, ONNX, and a manifest.

    source.py    the masked training network of a finished run (what export must reproduce)
    channel.py   physical removal of off channel units (torch-pruning), history + state storage
    csr.py       the CSR bundle of an irregular run (weights.csr.npz)
    onnx.py      ONNX export with a dynamic batch, sparse initializers, parity
    deploy.py    export_run(ExportConfig) -> DeployResult (what dnr-export runs)
    loader.py    load_deployed_model(deploy_dir) -> nn.Module

The deploy dir's names and manifest live in `dnr_deploy.deploydir`.
"""

from dnr_deploy.export.deploy import DeployResult, ExportConfig, ExportFormat, export_run
from dnr_deploy.export.errors import ExportCheckFailed, ExportError
from dnr_deploy.export.loader import load_deployed_model
from dnr_deploy.export.source import SourceRun, load_source

__all__ = ["DeployResult", "ExportCheckFailed", "ExportConfig", "ExportError", "ExportFormat",
           "SourceRun", "export_run", "load_deployed_model", "load_source"]
