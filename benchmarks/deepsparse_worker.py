"""DeepSparse's side of sparse_runtime.py's side-by-side: run in DeepSparse's own venv (it is
end of life with an evaluation-only licence: a benchmark-only install, never a dependency of
this project), driven over stdin/stdout by one JSON line a command, so the three runtimes take
turns in one run while each times its own calls (no pipe in the figures).

    python -m venv .venv-deepsparse && .venv-deepsparse/bin/pip install deepsparse==1.8.0
    python benchmarks/sparse_runtime.py --deepsparse .venv-deepsparse/bin/python ...

Commands: {"load": ONNX, "batch": N, "threads": T, "input": NPY} compiles an engine (the
ONNX file with dense initializers, IR 8, opset 13: what DeepSparse 1.8 reads; DeepSparse finds
the zeros itself) and keeps the input; {"turn": K} makes one untimed and K timed calls and
answers their milliseconds; {"layers": K} answers DeepSparse's own per-layer profile over K
calls (its debug analysis: each fused layer's milliseconds and the ONNX tensors it computes);
{"output": true} answers the logits of the kept input.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    import deepsparse

    engine, feed, load = None, None, {}
    for line in sys.stdin:
        command = json.loads(line)
        if "load" in command:
            load = command
            engine = deepsparse.compile_model(command["load"], batch_size=command["batch"],
                                              num_cores=command["threads"])
            feed = [np.load(command["input"])]
            engine.run(feed)
            answer = {"version": deepsparse.__version__}
        elif "turn" in command:
            engine.run(feed)
            times = []
            for _ in range(command["turn"]):
                begin = time.perf_counter_ns()
                engine.run(feed)
                times.append((time.perf_counter_ns() - begin) / 1e6)
            answer = {"ms": times}
        elif "layers" in command:
            analysis = deepsparse.model_debug_analysis(
                load["load"], feed, batch_size=load["batch"], num_cores=load["threads"],
                num_iterations=command["layers"], num_warmup_iterations=5)
            answer = {"layers": [{"name": layer["name"], "tensors": layer["canonical_name"],
                                  "ms": layer["average_run_time_in_ms"]}
                                 for layer in analysis["layer_info"]],
                      "total_ms": analysis["average_total_time"]}
        else:
            answer = {"logits": engine.run(feed)[0].tolist()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
