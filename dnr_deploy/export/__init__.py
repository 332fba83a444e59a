"""Turning a run into deployable artifacts: shrunk or CSR weights, ONNX, and a manifest."""
