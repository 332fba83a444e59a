"""Runtimes taking turns in one run, each timing its own calls: the sparse engine, ONNX Runtime
and DeepSparse (in its own venv, through deepsparse_worker.py), for sparse_runtime.py.

A runner is `turn(k) -> [ms, ...]`: one untimed call (its weights back in cache, as deployed
alone) and k timed ones. The order flips every round, so a slow spell of a shared machine lands
on every runtime alike (dnr-bench's `time_sessions` does the same for two sessions in-process).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dnr_deploy.runtime.torch_ops import sparse_to_dense

Runner = Callable[[int], list[float]]
WORKER = Path(__file__).resolve().parent / "deepsparse_worker.py"


def call_runner(call: Callable[[], object]) -> Runner:
    """A runner of an in-process runtime's call."""
    def turn(k: int) -> list[float]:
        call()
        times = []
        for _ in range(k):
            begin = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - begin) / 1e6)
        return times
    return turn


# Before each turn: ONNX Runtime's and OpenMP's idle workers spin for a while after a call
# (ORT's allow_spinning default), and with 2 threads on 2 cores a spinning worker of the
# runtime before would take a core from the one timed
PAUSE_S = 0.05


def time_in_turns(runners: dict[str, Runner], runs: int, turn: int) -> dict[str, float]:
    """The p50 milliseconds of each runner over `runs` timed calls, `turn` at a time."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(-(-runs // turn)):
        for name in names if index % 2 == 0 else names[::-1]:
            time.sleep(PAUSE_S)
            times[name] += runners[name](min(turn, runs - index * turn))
    return {name: float(np.median(values)) for name, values in times.items()}


def dense_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its sparse initializers stored dense (zeros written out)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for sparse in model.graph.sparse_initializer:
        model.graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse),
                                                               sparse.values.name))
    del model.graph.sparse_initializer[:]
    return model


def for_deepsparse(model: onnx.ModelProto) -> onnx.ModelProto:
    """A dense copy DeepSparse 1.8 reads: IR 8 and opset 13. The exports' opset 18 differs
    there only in the reductions' axes (an input since 18, an attribute before) and two newer
    attributes: noop_with_empty_axes (default 0, and the axes are never empty here) and
    Reshape's allowzero (which changes nothing where no target dimension is 0)."""
    model = dense_copy(model)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                      for n in model.graph.node if n.op_type == "Constant"})
    for node in model.graph.node:
        if node.op_type == "Reshape" and 0 in constants.get(node.input[1], [0]):
            raise ValueError(f"{node.name}: a Reshape to a 0 dimension (allowzero matters)")
        kept = [a for a in node.attribute if a.name not in ("allowzero", "noop_with_empty_axes")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if node.op_type.startswith("Reduce") and len(node.input) > 1:
            axes = [int(a) for a in constants[node.input[1]]]
            del node.input[1]
            node.attribute.append(helper.make_attribute("axes", axes))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 13
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class DeepSparse:
    """A DeepSparse engine in another interpreter (the benchmark-only venv)."""

    def __init__(self, python: str, model: onnx.ModelProto, x: np.ndarray, threads: int) -> None:
        self._folder = tempfile.TemporaryDirectory()
        folder = Path(self._folder.name)
        onnx.save(for_deepsparse(model), folder / "model.onnx")
        np.save(folder / "input.npy", x)
        self._process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.version = self._ask({"load": str(folder / "model.onnx"), "batch": len(x),
                                  "threads": threads, "input": str(folder / "input.npy")}
                                 )["version"]

    def _ask(self, command: dict) -> dict:
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the DeepSparse worker stopped (its stderr is above)")
        return json.loads(line)

    def turn(self, k: int) -> list[float]:
        return self._ask({"turn": k})["ms"]

    def layers(self, rounds: int) -> dict:
        """DeepSparse's per-layer profile: {"layers": [{name, tensors, ms}], "total_ms"}."""
        return self._ask({"layers": rounds})

    def logits(self) -> np.ndarray:
        return np.array(self._ask({"output": True})["logits"], np.float32)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()
        self._folder.cleanup()
