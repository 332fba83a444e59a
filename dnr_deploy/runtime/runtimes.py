"""Which engine runs a deploy dir's network in bench and verify: ONNX Runtime or the sparse
runtime (`auto`, the default: the sparse engine for irregular deploy dirs on the CPU), and the
parity check that must pass before the sparse runtime's figures count."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np

PARITY_ATOL = 1e-4  # max |logit difference| between the sparse runtime and ONNX Runtime


class Runtime(str, Enum):
    """The values are what `--runtime` accepts."""

    AUTO = "auto"  # sparse for an irregular float deploy dir on the CPU, else ort
    ORT = "ort"  # ONNX Runtime on model.onnx (every granularity)
    SPARSE = "sparse"  # dnr_deploy.runtime.sparse on weights.csr.npz, or on weights.int8.npz


class RuntimeChoiceError(ValueError):
    """An unknown runtime, or the sparse runtime asked to run what it cannot."""


class SparseUnsupportedError(RuntimeChoiceError):
    """The sparse runtime has no step for an op of this graph (auto then uses ONNX Runtime)."""


def choose_runtime(requested: str, manifest: dict, provider: str) -> tuple[Runtime, str]:
    """(the runtime that runs this deploy dir, why): `requested` unless it is auto."""
    chosen = parse_runtime(requested)
    if chosen is not Runtime.AUTO:
        return chosen, f"--runtime {chosen.value}"
    from dnr_deploy.deploydir.names import CSR_FILE, FP32_MODEL_FILE

    files = manifest.get("files") or {}
    if provider != "cpu":
        return Runtime.ORT, f"auto: --provider {provider} (the sparse engine runs on the CPU)"
    if CSR_FILE not in files:
        return Runtime.ORT, f"auto: a {manifest.get('granularity') or 'dense'} deploy dir"
    if FP32_MODEL_FILE in files:  # Int8Graph is numpy between layers: ORT int8 is faster
        return Runtime.ORT, ("auto: an int8 model.onnx (--runtime sparse runs its int8 CSR "
                             "in Int8Graph)")
    return Runtime.SPARSE, "auto: an irregular deploy dir"


def parse_runtime(name: str) -> Runtime:
    """Raises:
        RuntimeChoiceError: `name` is not a known runtime; the message lists them."""
    try:
        return Runtime(name)
    except ValueError:
        known = ", ".join(r.value for r in Runtime)
        raise RuntimeChoiceError(f"unknown runtime {name!r}; available: {known}") from None


def parse_placement(runtime: str, provider: str) -> Runtime:
    """The runtime bench and verify will use, checked against the execution provider.

    Raises:
        ValueError: an unknown runtime or provider, or the sparse runtime off the CPU.
    """
    from dnr_deploy.runtime.session import parse_provider

    parse_provider(provider)
    chosen = parse_runtime(runtime)
    if chosen is Runtime.SPARSE and provider != "cpu":
        raise RuntimeChoiceError(f"--runtime sparse runs on the CPU; drop --provider {provider}")
    return chosen


def open_sparse(deploy_dir: str | Path, threads: int, verify_key: str | Path | None = None,
                model_spec: str | None = None, trust_model_code: bool = False):
    """The sparse runtime's model of an irregular deploy dir: the float engine, or for an int8
    deploy dir `Int8Graph` on its int8 CSR (a manifest's MODULE:FACTORY spec is imported only
    when `model_spec` names it or `trust_model_code` is set; neither engine needs one).

    Raises:
        RuntimeChoiceError: a channel or dense deploy dir, or an op without a sparse step.
        ManifestError: not a deploy dir, or a file that fails its sha256.
    """
    from dnr_deploy.runtime.sparse import (
        NotIrregularError,
        UnsupportedLayerError,
        load_deploy_dir,
    )
    from dnr_deploy.runtime.sparse.int8_graph import UnsupportedInt8Graph

    try:
        return load_deploy_dir(deploy_dir, threads, verify_key, model_spec, trust_model_code)
    except NotIrregularError as err:
        raise RuntimeChoiceError(f"--runtime sparse: {err}") from None
    except (UnsupportedLayerError, UnsupportedInt8Graph) as err:
        raise SparseUnsupportedError(f"--runtime sparse: {err}") from None


def is_int8(model) -> bool:
    """Whether `open_sparse` gave the int8 runner (its figures are the int8 kernels')."""
    from dnr_deploy.runtime.sparse.int8_graph import Int8Graph

    return isinstance(model, Int8Graph)


def parity_reference(model, deploy_dir: Path, manifest: dict, session) -> tuple:
    """(what the sparse runtime's logits are held to, the limit): ONNX Runtime's session of
    model.onnx within PARITY_ATOL for a float graph. For an int8 one, ONNX Runtime's
    reference int8 math within the manifest's int8_atol: the export gated the deployed
    session against that same reference and limit, and integer rounding differs between
    fused kernels."""
    if not is_int8(model):
        return session, PARITY_ATOL
    from dnr_deploy.deploydir.names import MODEL_FILE
    from dnr_deploy.export.quantize import reference_session

    record = manifest.get("quantization") or {}
    return reference_session(Path(deploy_dir) / MODEL_FILE), float(record["int8_atol"])


def check_parity(sparse_logits: np.ndarray, ort_logits: np.ndarray, what: str,
                 atol: float = PARITY_ATOL) -> dict:
    """Max |difference| and argmax agreement of the two runtimes' logits on the same images.
    The limit alone decides: within `atol` a prediction can differ only where ONNX Runtime's
    two largest logits are within 2 x `atol` (a near tie, both answers inside the allowed
    difference), so differing predictions are counted, not refused.

    Raises:
        RuntimeChoiceError: they differ by more than `atol`; the sparse runtime's figures
            would then describe another model.
    """
    if not ort_logits.size:
        return {"max_abs": 0.0, "same_argmax": True, "atol": atol, "images": what}
    max_abs = float(np.abs(sparse_logits - ort_logits).max())
    differing = int((sparse_logits.argmax(1) != ort_logits.argmax(1)).sum())
    if max_abs > atol:
        raise RuntimeChoiceError(
            f"the sparse runtime's logits differ from ONNX Runtime's on {what} by up to "
            f"{max_abs:.3g} (limit {atol:g}), argmax {'different' if differing else 'equal'}; "
            "report it, and use --runtime ort meanwhile")
    return {"max_abs": max_abs, "same_argmax": not differing,
            "near_ties_differing": differing, "atol": atol, "images": what}


def sparse_info(model, threads: int) -> dict:
    """What a sparse-runtime figure was measured with: kernel, threads, layers, MACs."""
    if is_int8(model):
        from dnr_deploy.runtime.sparse import int8

        return {"name": Runtime.SPARSE.value, "dtype": "int8",
                "engine": "dnr_deploy.runtime.sparse.int8_graph",
                "kernel": int8.kernel_name(model.path), "threads": threads,
                "layers": len(model.int8_nodes), "dense_fallback_layers": 0,
                "winograd_layers": 0, "winograd_layers_single": 0}
    from dnr_deploy.runtime.sparse.native import kernel_name

    dense_layers = sum(1 for layer, _ in model.layers if layer.dense)
    return {"name": Runtime.SPARSE.value, "dtype": "float32",
            "engine": "dnr_deploy.runtime.sparse", "kernel": kernel_name(),
            "threads": threads, "layers": len(model.layers),
            "dense_fallback_layers": dense_layers,
            # convs with machine code of their own where calls take 16-float vectors (AVX-512)
            "generated_code_layers": sum(1 for layer, _ in model.layers
                                         if getattr(layer, "codegen", False)),
            # on chunks of 4 images or more, and on single images (a threshold of their own);
            # where generated code also runs, a timed first call picks one of the two
            "winograd_layers": model.winograd_layers(),
            "winograd_layers_single": model.winograd_layers(batch=1)}
