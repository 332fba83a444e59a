"""What code generated for each layer's nonzeros would buy: the ceiling of a run-time emitter,
measured before writing one (issue 26), and now beside the emitter the engine has (codegen.py).

DeepSparse compiles code for each layer; our sparse kernel is compiled ahead of time for any
weights. For each conv of a DNR-trained deploy dir (dnr_masks.py), this writes C with the
layer's mask compiled in, compiles it with the machine's gcc (a stand-in for an emitter: a
deployment has no compiler, so nothing here ships) and times it beside the engine's
`SparseConv` on the same weights and input, one pinned thread: its ahead-of-time kernel, and
the code its own emitter generates at load time (where the CPU has AVX-512).

The generated code keeps R output channels x T pixels of accumulators in registers (one pixel
of 16 images a 16-float vector, the input zero-padded). For each input column (channel, tap)
that any of the R rows uses, it loads the T input vectors once and multiply-adds them into
every row with a weight there: no index and no branch per nonzero. Outputs must equal the
engine's (checked per layer).

    cd benchmarks; python generated_code.py --models vgg16 resnet18 --blocks 24x1
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import pin_cpus, write_results
from dnr_masks import dnr_deploy_dir, input_shape
from onnx import shape_inference
from side_by_side import call_runner, dense_copy, time_in_turns

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse.onnx_graph import read_constants
from dnr_deploy.runtime.sparse.plan import SparseConv

IMAGES = 16  # one AVX-512 vector: one pixel of 16 images
TURNS = 5


def conv_layers(model: onnx.ModelProto, min_density: float) -> list[dict]:
    """The model's ungrouped, undilated convs with square strides and equal pads, at least
    `min_density` dense, with their input and output sizes (from ONNX shape inference on a
    dense copy: the inference does not take sparse initializers)."""
    dense = dense_copy(model)
    constants = read_constants(dense.graph)
    inferred = shape_inference.infer_shapes(dense)
    sizes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in [*inferred.graph.value_info, *inferred.graph.input]}
    layers = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = constants.get(node.input[1]) if node.op_type == "Conv" else None
        strides, pads = list(attrs.get("strides", [1, 1])), list(attrs.get("pads", [0] * 4))
        if weight is None or attrs.get("group", 1) != 1 or set(attrs.get("dilations", [1]))\
                != {1} or len(set(strides)) != 1 or len(set(pads)) != 1:
            continue
        density = float(np.count_nonzero(weight)) / weight.size
        if density >= min_density:
            layers.append({"name": node.output[0], "weight": weight.astype(np.float32),
                           "stride": strides[0], "pad": pads[0], "density": density,
                           "in_hw": sizes[node.input[0]][2], "out_hw": sizes[node.output[0]][2]})
    return layers


def _padded_size(layer: dict) -> int:
    """The padded input planes' side: the pads, and two columns of slack for odd sizes."""
    return layer["in_hw"] + 2 * layer["pad"] + 2


def c_source(layer: dict, rows: int, pixels: int, symbol: str) -> tuple[str, np.ndarray]:
    """C for one layer with its mask compiled in, and its weights in the order the code reads
    them. The input is (C, Hp, Wp, 16) zero-padded, the output (O, H, W, 16), ReLU applied."""
    weight, stride, out_hw = layer["weight"], layer["stride"], layer["out_hw"]
    out_chans, in_chans, kernel_h, kernel_w = weight.shape
    padded = _padded_size(layer)
    lines, values, blocks = ["#include <immintrin.h>"], [], []
    for first in range(0, out_chans, rows):
        block = range(first, min(out_chans, first + rows))
        blocks.append(f"{symbol}_{first}")
        lines += [f"static void {symbol}_{first}(const float* in, float* out, const float* w) {{",
                  f"  for (int y = 0; y < {out_hw}; ++y)",
                  f"  for (int x = 0; x + {pixels} <= {out_hw}; x += {pixels}) {{",
                  f"    const float* p = in + ({stride} * y * {padded} + {stride} * x) * 16;"]
        lines += [f"    __m512 a{r}_{t} = _mm512_setzero_ps();"
                  for r in range(len(block)) for t in range(pixels)]
        for chan in range(in_chans):
            for kh in range(kernel_h):
                for kw in range(kernel_w):
                    users = [(r, weight[o, chan, kh, kw]) for r, o in enumerate(block)
                             if weight[o, chan, kh, kw] != 0]
                    if not users:
                        continue
                    offset = ((chan * padded + kh) * padded + kw) * 16
                    lines.append("    {")
                    lines += [f"      __m512 v{t} = _mm512_loadu_ps(p + "
                              f"{offset + 16 * stride * t});" for t in range(pixels)]
                    for r, value in users:
                        lines.append(f"      {{ __m512 b = _mm512_set1_ps(w[{len(values)}]);")
                        lines += [f"        a{r}_{t} = _mm512_fmadd_ps(v{t}, b, a{r}_{t});"
                                  for t in range(pixels)]
                        lines.append("      }")
                        values.append(value)
                    lines.append("    }")
        lines += [f"    _mm512_storeu_ps(out + (({o} * {out_hw} + y) * {out_hw} + x + {t}) * 16,"
                  f" _mm512_max_ps(a{r}_{t}, _mm512_setzero_ps()));"
                  for r, o in enumerate(block) for t in range(pixels)]
        lines += ["  }", "}"]
    lines.append(f"void {symbol}(const float* in, float* out, const float* w) {{")
    lines += [f"  {name}(in, out, w);" for name in blocks]
    lines.append("}")
    return "\n".join(lines), np.asarray(values, np.float32)


def compile_layer(source: str, folder: Path, symbol: str):
    """The compiled layer's function (gcc -O1: -O2 took minutes on the largest layers for
    the same speed)."""
    path = folder / f"{symbol}.c"
    path.write_text(source)
    subprocess.run(["gcc", "-O1", "-march=native", "-shared", "-fPIC", "-o",
                    str(path.with_suffix(".so")), str(path)], check=True)
    return getattr(ctypes.CDLL(str(path.with_suffix(".so"))), symbol)


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return array.ctypes.data_as(ctypes.c_void_p)


def measure(layer: dict, rows: int, pixels: int, folder: Path, rounds: int) -> dict:
    """One layer and register block: generated code against SparseConv (two chunks of 8
    images, the engine's batch-16 unit), medians of `rounds` calls each, timed in turns."""
    weight, pad, in_hw = layer["weight"], layer["pad"], layer["in_hw"]
    out_chans, in_chans = weight.shape[:2]
    symbol = "layer_" + "".join(c if c.isalnum() else "_" for c in layer["name"]) + \
        f"_{rows}x{pixels}"  # one library per layer and block: dlopen reuses a loaded path
    source, values = c_source(layer, rows, pixels, symbol)
    function = compile_layer(source, folder, symbol)
    images = np.random.default_rng(0).random((in_chans, in_hw, in_hw, IMAGES), np.float32)
    side = _padded_size(layer)
    padded = np.zeros((in_chans, side, side, IMAGES), np.float32)
    padded[:, pad:pad + in_hw, pad:pad + in_hw] = images
    out = np.zeros((out_chans, layer["out_hw"], layer["out_hw"], IMAGES), np.float32)
    conv = SparseConv(weight, np.zeros(out_chans, np.float32), layer["stride"], pad, True)
    # the sparse kernel itself, whatever the engine would pick
    conv.winograd, conv.codegen = False, False
    # ... and the engine's own generated code (codegen.py), where this CPU runs it
    emitted = SparseConv(weight, np.zeros(out_chans, np.float32), layer["stride"], pad, True)
    emitted.winograd = False
    halves = [np.ascontiguousarray(images[..., :8]), np.ascontiguousarray(images[..., 8:])]

    def generated() -> None:
        function(_pointer(padded), _pointer(out), _pointer(values))

    def kernel() -> None:
        for half in halves:
            conv(half, threads=1)

    def emitter() -> None:
        for half in halves:
            emitted(half, threads=1)

    generated()
    # the kernel returns a view of its own buffer, which its next call overwrites
    expected = np.concatenate([conv(half, threads=1).copy() for half in halves], axis=-1)
    difference = float(np.abs(expected - out).max())
    if difference > 1e-3 * max(1.0, float(np.abs(out).max())):
        sys.exit(f"generated code for {layer['name']} differs from SparseConv by {difference}")
    runners = {"generated": call_runner(generated), "kernel": call_runner(kernel)}
    if emitted.codegen:  # its first calls, here, make the code
        difference = max(difference, float(np.abs(np.concatenate(
            [emitted(half, threads=1).copy() for half in halves], axis=-1) - out).max()))
        if difference > 1e-3 * max(1.0, float(np.abs(out).max())) or \
                emitted.paths() != {"generated"}:
            sys.exit(f"the emitter's code for {layer['name']} did not run or differs")
        runners["emitter"] = call_runner(emitter)
    # in turns, so a busy spell on the shared host hits all alike
    ms = time_in_turns(runners, rounds, max(1, rounds // TURNS))
    macs = int(np.count_nonzero(weight)) * layer["out_hw"] ** 2 * IMAGES
    return {"layer": layer["name"], "shape": [in_chans, out_chans, in_hw, layer["out_hw"]],
            "kernel_size": list(weight.shape[2:]), "stride": layer["stride"],
            "density": layer["density"], "block": f"{rows}x{pixels}",
            "generated_ms": ms["generated"], "kernel_ms": ms["kernel"],
            "generated_gmacs": macs / ms["generated"] / 1e6,
            "kernel_gmacs": macs / ms["kernel"] / 1e6,
            "speedup": ms["kernel"] / ms["generated"], "max_difference": difference,
            **({"emitter_ms": ms["emitter"], "emitter_gmacs": macs / ms["emitter"] / 1e6,
                "emitter_speedup": ms["kernel"] / ms["emitter"]} if "emitter" in ms else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--blocks", nargs="+", default=["24x1"],
                        help="register blocks, output channels x pixels")
    parser.add_argument("--min-density", type=float, default=0.1,
                        help="layers at least this dense (below it the kernel was not beaten)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--name", default="generated_code")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        sys.exit("generated_code.py needs gcc (the stand-in for an emitter)")
    blocks = [tuple(int(n) for n in block.split("x")) for block in args.blocks]
    pin_cpus(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            deploy = dnr_deploy_dir(model, args.density)
            shape = input_shape(deploy)
            rows, own = [], Path(folder) / model  # layer names repeat across models
            own.mkdir()
            for layer in conv_layers(onnx.load(str(deploy / "model.onnx")), args.min_density):
                for block_rows, pixels in blocks:
                    if layer["out_hw"] % pixels:
                        continue
                    row = measure(layer, block_rows, pixels, own, args.rounds)
                    rows.append(row)
                    print(f"{model} {row['layer']:12s} {row['shape']} s{row['stride']} "
                          f"d{row['density']:.3f} {row['block']:>5s}: generated "
                          f"{row['generated_gmacs']:.1f} GMAC/s, kernel "
                          f"{row['kernel_gmacs']:.1f} ({row['speedup']:.2f}x), emitter "
                          f"{row.get('emitter_gmacs', float('nan')):.1f}", flush=True)
            results[model] = {"deploy_dir": str(deploy), "input_shape": shape, "rows": rows}
    write_results(args.name, {"command": "python " + " ".join(sys.argv), "args":
                                     vars(args), "machine": machine_info(), "models": results})


if __name__ == "__main__":
    main()
