"""Turning a run into deployable artifacts: shrunk or CSR weights, ONNX, and a manifest.

    channel.py   physical removal of off channel units (torch-pruning), history + state storage
    csr.py       the CSR bundle of an irregular run (weights.csr.npz)
    onnx.py      ONNX export with a dynamic batch, sparse initializers, ORT sessions, parity
    manifest.py  manifest.json: build, write, load_manifest, verify_files, the summary
    deploy.py    export_run(ExportConfig) -> DeployResult (what dnr-export runs), and
                 load_deployed_model(deploy_dir) -> nn.Module
"""
