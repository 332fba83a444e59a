"""The two ways an export fails: bad input (exit 2) and a failed check (exit 1)."""


class ExportError(ValueError):
    """Bad input to an export: options, a run that cannot be exported, an occupied --out."""


class ExportCheckFailed(RuntimeError):
    """A check on the exported artifacts failed (parity gate, CSR round trip, onnx.checker);
    nothing was written."""
