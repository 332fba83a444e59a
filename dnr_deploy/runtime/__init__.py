"""Deployed artifacts in ONNX Runtime: sessions, latency (bench), robustness (verify)."""
