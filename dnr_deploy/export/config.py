"""Every setting of an export (ExportConfig), in a module that imports no torch or ONNX:
`dnr-export --help` builds its parser from these fields at once. Re-exported by
dnr_deploy.export."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dnr_deploy.config import check_settings, option
from dnr_deploy.parity import (
    PARITY_ATOL,
    PARITY_RTOL,
    PARITY_RTOL_BOUNDS,
    ROUNDING_FACTOR,
    ROUNDING_FACTOR_BOUNDS,
)
from dnr_deploy.vocabulary import ReduceRange


class ExportFormat(str, Enum):
    ONNX = "onnx"  # model.onnx plus the PyTorch-loadable weights
    CSR = "csr"  # weights.csr.npz alone (irregular runs)


@dataclass
class ExportConfig:
    """Every setting of an export; the only place their defaults are written."""

    run_dir: str | None = None  # None: the latest run recorded in runs/LATEST
    out: str | None = option(None, 'deploy dir to create (default: RUN_DIR/deploy)')
    model: str | None = option(
        None, "the run's model spec, named by you: a MODULE:FACTORY spec in run.json is "
        "imported only when it is named here (or with --trust-model-code)")
    trust_model_code: bool = option(
        False, "import whatever MODULE:FACTORY the run's run.json names (runs its code)")
    format: str = option(
        ExportFormat.ONNX.value,
        'onnx: model.onnx plus loadable weights (and the CSR bundle for irregular runs); '
        'csr: the CSR bundle alone (irregular runs)')
    baseline: bool = option(
        False, 'also write baseline.onnx, the unpruned architecture, for side-by-side benchmarks')
    force: bool = option(False, 'replace a non-empty --out')
    parity_samples: int = option(512, 'test images for the parity checks', '>= 1')
    data_dir: str | None = option(
        None, "folder holding the run's dataset (default: the run's own --data-dir)")
    opset: int = option(18, 'ONNX opset (ONNX Runtime 1.18+)', '[17, 23]')
    parity_atol: float = option(
        PARITY_ATOL, 'largest |logit difference| allowed between ONNX Runtime and PyTorch',
        '> 0')
    parity_rtol: float = option(
        PARITY_RTOL, "plus this fraction of the largest |logit|: float32 rounding grows with the "
        "logits, which a barely trained network can push to 1e8", PARITY_RTOL_BOUNDS)
    parity_rounding_factor: float = option(
        ROUNDING_FACTOR, "or, if larger, this many times PyTorch's own float32 rounding on "
        "the parity images (|float32 - float64| logits): rounding grows with a network's "
        "activations, which can dwarf its logits", ROUNDING_FACTOR_BOUNDS)
    shrink_atol: float = option(
        1e-5, 'largest |logit difference| allowed between shrunk and masked network, plus '
        'the larger of the parity rtol and rounding terms', '> 0')
    quantize: str | None = option(
        None, 'int8: model.onnx becomes a static QDQ int8 graph (per-channel int8 weights, '
        'uint8 activations calibrated on training images) and the float graph stays as '
        'model.fp32.onnx; irregular runs add int8 CSR weights (weights.int8.npz)')
    calibration_images: int = option(256, 'training images that calibrate --quantize int8',
                                     '>= 1')
    reduce_range: str = option(
        ReduceRange.AUTO.value, "7-bit int8 weights: auto (on unless this CPU has VNNI, where "
        "8-bit weights would saturate the fused kernels), on, off")
    int8_atol: float = option(
        0.25, "largest |logit difference| allowed between the deployed int8 session and "
        "ONNX Runtime's reference int8 math", '> 0')
    int8_max_drop: float = option(
        1.0, 'percentage points of clean accuracy int8 may lose against float on the parity '
        'images before the export fails', '[0, 100]')
    sign: str | None = option(
        None, "private key (PEM, elliptic curve) to sign the deploy dir with (model.sig): "
        "signed without a verdict; dnr-verify --sign signs it again with the gate's")

    def validated(self) -> ExportConfig:
        """Raises:
            ExportError: an unknown format or a value out of range, with the allowed values."""
        from dnr_deploy.export.errors import ExportError

        check_settings(self, ExportError)  # finite and in range: every numeric field
        formats = [f.value for f in ExportFormat]
        if self.format not in formats:
            raise ExportError(f"unknown format {self.format!r}; available: {', '.join(formats)}")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"unknown --quantize {self.quantize!r}; available: int8")
        try:
            ReduceRange(self.reduce_range)
        except ValueError:
            known = ", ".join(r.value for r in ReduceRange)
            raise ExportError(f"unknown --reduce-range {self.reduce_range!r}; available: "
                              f"{known}") from None
        return self
