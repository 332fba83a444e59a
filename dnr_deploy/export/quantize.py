"""int8 static quantization of an exported ONNX graph (`dnr-export --quantize int8`).

onnxruntime.quantization does the work: `quant_pre_process` (shape inference, ORT's basic
graph optimizations), then `quantize_static` in the QDQ format with per-channel int8 weights
and uint8 activations calibrated (MinMax) on training images. What this module adds is the
choice of `reduce_range` and the two numbers the export gates on.

reduce_range: x86 CPUs without VNNI run int8 convolutions through u8 x s8 multiplies whose
16-bit pair sums saturate; with full 8-bit weights the fused kernels then drift from the int8
math (measured on this project's AVX2 CPU: 0.885 logits off, 0.055 with reduce_range, which
keeps weights to 7 bits). ONNX Runtime's documentation recommends reduce_range there. CPUs with
VNNI (AVX512-VNNI or AVX-VNNI) and GPUs do not saturate, so `auto` keeps the full range on them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnr_deploy.deploydir.names import INPUT_NAME
from dnr_deploy.vocabulary import ReduceRange  # noqa: F401  (re-exported)

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class RangeChoice:
    reduce_range: bool
    reason: str  # recorded in the manifest


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere: then VNNI is not assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def choose_reduce_range(setting: str, flags: set[str] | None = None) -> RangeChoice:
    """`reduce_range` for `setting` ("auto", "on", "off") on a CPU with `flags`.

    Raises:
        ValueError: an unknown setting.
    """
    chosen = ReduceRange(setting)
    if chosen is ReduceRange.ON:
        return RangeChoice(True, "--reduce-range on")
    if chosen is ReduceRange.OFF:
        return RangeChoice(False, "--reduce-range off")
    found = sorted(set(VNNI_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return RangeChoice(False, f"auto: this CPU has {', '.join(found)}")
    return RangeChoice(True, "auto: this CPU has no VNNI, so 8-bit weights would saturate")


class _Images:
    """onnxruntime.quantization's CalibrationDataReader over an array, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self._batches = iter([images[b:b + batch_size]
                              for b in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # part of the reader protocol; one pass is all MinMax needs
        pass


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray,
                  reduce_range: bool) -> None:
    """Write the static QDQ int8 form of `fp32_path` to `out_path`.

    Args:
        calibration: float32 NCHW images in [0, 1] (training images) that set the activation
            ranges.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared), str(out_path), _Images(calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False})


def reference_session(path: Path):
    """A session that runs every QuantizeLinear / DequantizeLinear as written, with float ops
    between them: ONNX Runtime's reference int8 math, against which the fused kernels of the
    deployed session are checked."""
    from dnr_deploy.runtime.session import create_session

    return create_session(path, optimize=False)[0]
