"""ONNX Runtime sessions with explicit providers and session options, recorded for the report.

Every session bench and verify open goes through `create_session`, so the provider, thread
counts and graph optimization level are chosen in one place and written into bench.json and
verify.json as `SessionInfo.as_dict()`. ONNX Runtime falls back to the CPU silently when a
requested provider cannot start; here that is an error, because a benchmark that says "cuda"
must have run on the GPU.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from dnr_deploy.deploydir.names import INPUT_NAME, OUTPUT_NAME


class Provider(str, Enum):
    """Where a session runs; the values are what `--provider` accepts."""

    CPU = "cpu"
    CUDA = "cuda"


ORT_PROVIDERS = {
    Provider.CPU: ["CPUExecutionProvider"],
    # CPU stays listed as ORT's fallback for ops without a CUDA kernel (ORT's own advice).
    Provider.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


class SessionError(ValueError):
    """An ONNX file that ONNX Runtime cannot load, or a provider that is not available."""


@dataclass(frozen=True)
class SessionInfo:
    """What a session was opened with: the figures a latency table depends on."""

    file: str
    provider: str
    providers: list[str]  # as the session reports them, in priority order
    intra_op_num_threads: int
    inter_op_num_threads: int
    execution_mode: str
    graph_optimization_level: str
    onnxruntime: str

    def as_dict(self) -> dict:
        return asdict(self)


def parse_provider(name: str) -> Provider:
    """Raises:
        SessionError: `name` is not a known provider; the message lists the known ones."""
    try:
        return Provider(name)
    except ValueError:
        known = ", ".join(p.value for p in Provider)
        raise SessionError(f"unknown provider {name!r}; available: {known}") from None


def check_provider(provider: Provider) -> None:
    """Raises:
        SessionError: the provider's ONNX Runtime build is not installed (for cuda: the
            `onnxruntime-gpu` package instead of `onnxruntime`)."""
    import onnxruntime as ort

    wanted = ORT_PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if wanted not in available:
        hint = (" --provider cuda needs the onnxruntime-gpu package (pip uninstall onnxruntime; "
                "pip install onnxruntime-gpu) and a CUDA GPU;" if provider is Provider.CUDA else "")
        raise SessionError(
            f"{wanted} is not available in this onnxruntime {ort.__version__};{hint} "
            f"available: {', '.join(available)}"
        )


def create_session(path: str | Path, provider: str | Provider = Provider.CPU, threads: int = 1,
                   optimize: bool = True):
    """Open `path` in ONNX Runtime with explicit providers and options. `optimize=False` runs
    the graph as written (no fusions): for an int8 QDQ graph, ONNX Runtime's reference int8 math.

    One intra-op thread is the usual choice on small CPUs: on the 2-core reference machine two
    threads were slower (DESIGN.md section 7), and one thread makes timings repeatable.

    Returns:
        (onnxruntime.InferenceSession, SessionInfo).

    Raises:
        SessionError: unknown or unavailable provider, a thread count below 1, a file that is
            missing, truncated or not ONNX, a provider that did not start, or a graph without
            the "input" / "logits" names of the export contract.
    """
    import onnxruntime as ort

    provider = provider if isinstance(provider, Provider) else parse_provider(provider)
    check_provider(provider)
    if threads < 1:
        raise SessionError(f"threads must be at least 1, got {threads}")
    path = Path(path)
    if not path.is_file():
        raise SessionError(f"no ONNX file at {str(path)!r}")
    check_self_contained(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # these graphs are chains: no parallel branches to run
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=ORT_PROVIDERS[provider])
    except Exception as err:  # ORT raises its own types (InvalidProtobuf, Fail...): "unusable"
        raise SessionError(
            f"ONNX Runtime cannot load {str(path)!r} (truncated, damaged or not ONNX?): "
            f"{_ort_reason(err)}"
        ) from None
    started = session.get_providers()
    if started[0] != ORT_PROVIDERS[provider][0]:
        raise SessionError(
            f"{ORT_PROVIDERS[provider][0]} did not start for {path.name} (ONNX Runtime fell "
            f"back to {started[0]}); check the CUDA and cuDNN libraries onnxruntime-gpu needs"
        )
    _check_io(session, path)
    info = SessionInfo(
        file=path.name, provider=provider.value, providers=list(started),
        intra_op_num_threads=threads, inter_op_num_threads=options.inter_op_num_threads,
        execution_mode="sequential", graph_optimization_level="all" if optimize else "none",
        onnxruntime=ort.__version__,
    )
    return session, info


def check_self_contained(path: Path) -> None:
    """Walk the whole graph before ONNX Runtime reads it (`deploydir.graph_check`): no ONNX
    external data anywhere (a side file the manifest's sha256 does not cover could change the
    model unnoticed; dnr-export writes self-contained files), no unknown operator, no sparse
    tensor whose dense form is out of proportion to the file (ONNX Runtime densifies them).

    Raises:
        SessionError: not ONNX, or a graph the check refuses (its message).
    """
    from dnr_deploy.deploydir.graph_check import GraphCheckError, check_graph, load_graph

    try:
        check_graph(load_graph(path), path)
    except GraphCheckError as err:
        raise SessionError(str(err)) from None


def _ort_reason(err: Exception) -> str:
    """The informative end of an ORT load error, without its C++ source location and
    signature ("...model.cc:256 onnxruntime::Model::Model(...) Unsupported model IR...")."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"Load model from \S+ failed:", "", text)
    text = re.sub(r"/\S+\.(cc|h|cpp):\d+ \S+\(.*?\) ", "", text)
    return text[:300]


def _check_io(session, path: Path) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise SessionError(
            f"{str(path)!r} has inputs {inputs} and outputs {outputs}; a dnr-export graph has "
            f"one input {INPUT_NAME!r} and the output {OUTPUT_NAME!r}"
        )


def run_logits(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `x` (float32 NCHW in [0, 1]) from `session`, `batch_size` images at a time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    outputs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[start:start + batch_size]})[0]
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
