"""int8 sparse convolutions against fp32 sparse ones, layer by layer: every conv of VGG16 and
ResNet-18 (CIFAR variants, 32x32), summed over the network's convs, with the masks of a DNR run
(`--masks dnr`: dnr_masks.py's deploy dirs; DNR keeps the early layers dense) or DNR's initial
masks (`--masks random`: each layer at the density).

fp32: the sparse runtime's SparseConv (_kernels.cpp). int8: Int8SparseConv (_int8_kernels.cpp)
on uint8 activations, weights quantized per output row, ReLU and requantization to uint8 fused.
Both are called as the engine calls them (the input copied into the layer's padded planes, then
the kernel); they take turns, and each figure is the median of --repeats calls. Pooling, the
classifier and the residual additions are left out: this compares the kernels, not engines.
A second table times each int8 path this CPU runs (weights limited to [-64, 64], so the AVX2
path, exact only there, runs too) at one batch size.

    .venv/bin/python benchmarks/sparse_int8.py                  # batches 1 16 64, threads 1 2
    .venv/bin/python benchmarks/sparse_int8.py --batches 16 --threads 1 --repeats 5
    PYTHONPATH=. .venv/bin/python benchmarks/sparse_int8.py --masks dnr --name sparse_int8_dnr
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import scipy.sparse
import torch
from common import write_results
from dnr_masks import dnr_deploy_dir
from onnx import numpy_helper
from side_by_side import dense_copy
from torch import nn

from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse import int8
from dnr_deploy.runtime.sparse.plan import SparseConv
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks

SHAPE = (3, 32, 32)


def dnr_conv_layers(name: str, density: float) -> list[tuple[np.ndarray, int, int, tuple]]:
    """conv_layers of a DNR run's exported model.onnx (its sparse initializers densified)."""
    model = dense_copy(onnx.load(str(dnr_deploy_dir(name, density) / "model.onnx")))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*model.graph.input, *model.graph.value_info]}
    found = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: list(a.ints) for a in node.attribute}
            found.append((weights[node.input[1]], attrs.get("strides", [1])[0],
                          attrs.get("pads", [0])[0], shapes[node.input[0]][1:]))
    return found


def conv_layers(name: str, density: float, masks: str = "random"
                ) -> list[tuple[np.ndarray, int, int, tuple]]:
    """(masked weight, stride, padding, input shape C, H, W) of every conv, in order."""
    if masks == "dnr":
        return dnr_conv_layers(name, density)
    torch.manual_seed(0)
    model = create_model(name, 10, 3, [0.5] * 3, [0.25] * 3).eval()
    chosen = random_masks({n: w.detach() for n, w in prunable_weights(model).items()}, density,
                          torch.Generator().manual_seed(0))
    apply_masks(model, chosen)
    found = []

    def hook(module, inputs, _):
        found.append((module.weight.detach().numpy().copy(), module.stride[0],
                      module.padding[0], tuple(inputs[0].shape[1:])))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for handle in handles:
        handle.remove()
    return found


def int8_layer(weight: np.ndarray, stride: int, padding: int, limit: int) -> int8.Int8SparseConv:
    """The weight quantized symmetric per output row to [-limit, limit]."""
    rows = weight.reshape(weight.shape[0], -1)
    scale = np.maximum(np.abs(rows).max(axis=1), 1e-12) / limit
    q = np.rint(rows / scale[:, None]).astype(np.int8)
    m = scipy.sparse.csr_array(q.astype(np.int32))
    return int8.Int8SparseConv(weight.shape, stride, padding, m.indptr, m.indices,
                               m.data.astype(np.int8), scale.astype(np.float32),
                               np.zeros(len(q), np.float32), 0.02, 0, True, 0.05, 0)


def timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def bench(name: str, layers: list, batches: list[int], threads: list[int],
          repeats: int) -> dict:
    rng = np.random.default_rng(0)
    float_layers = [SparseConv(w, np.zeros(w.shape[0], np.float32), s, p, True)
                    for w, s, p, _ in layers]
    quant_layers = [int8_layer(w, s, p, 127) for w, s, p, _ in layers]
    rows = {}
    for batch in batches:
        xs = [rng.random((c, h, w, batch), dtype=np.float32) for _, _, _, (c, h, w) in layers]
        qs = [rng.integers(0, 256, x.shape).astype(np.uint8) for x in xs]
        for t in threads:
            fp32 = [0.0] * repeats
            i8 = [0.0] * repeats
            for fl, ql, x, q in zip(float_layers, quant_layers, xs, qs, strict=True):
                fl(x, threads=t)
                ql(q, threads=t)  # bind once, untimed
                for r in range(repeats):  # in turns, so load on the machine hits both alike
                    fp32[r] += timed(lambda fl=fl, x=x, t=t: fl(x, threads=t), 1)[0]
                    i8[r] += timed(lambda ql=ql, q=q, t=t: ql(q, threads=t), 1)[0]
            f, i = statistics.median(fp32), statistics.median(i8)
            # the fastest of the repeats too: on a shared machine, load only ever adds time
            fmin, imin = min(fp32), min(i8)
            rows[f"b{batch}_t{t}"] = {"batch": batch, "threads": t, "fp32_ms": round(1e3 * f, 3),
                                      "int8_ms": round(1e3 * i, 3),
                                      "int8_speedup": round(f / i, 3),
                                      "fp32_min_ms": round(1e3 * fmin, 3),
                                      "int8_min_ms": round(1e3 * imin, 3),
                                      "int8_speedup_min": round(fmin / imin, 3)}
            print(f"{name} batch {batch:3d} threads {t}: fp32 {1e3 * f:8.2f} ms, int8 "
                  f"{1e3 * i:8.2f} ms, int8 {f / i:.2f}x (fastest: {1e3 * fmin:.2f} / "
                  f"{1e3 * imin:.2f} ms, {fmin / imin:.2f}x)", flush=True)
    nonzeros = sum(int(np.count_nonzero(w)) for w, *_ in layers)
    fp32_bytes = sum(8 * int(np.count_nonzero(w)) + 4 * (w.shape[0] + 1) for w, *_ in layers)
    int8_bytes = sum(3 * int(np.count_nonzero(w)) + 4 * (w.shape[0] + 1) + 4 * w.shape[0]
                     for w, *_ in layers)
    return {"conv_layers": len(layers), "nonzeros": nonzeros,
            "csr_bytes_fp32": fp32_bytes, "csr_bytes_int8": int8_bytes,
            "csr_bytes_ratio": round(int8_bytes / fp32_bytes, 4), "timings": rows}


def bench_paths(name: str, layers: list, batch: int, repeats: int) -> dict:
    """Each int8 path's time over the network's convs, 1 thread, weights in [-64, 64]."""
    rng = np.random.default_rng(1)
    quant_layers = [int8_layer(w, s, p, 64) for w, s, p, _ in layers]
    qs = [rng.integers(0, 256, (c, h, w, batch)).astype(np.uint8)
          for _, _, _, (c, h, w) in layers]
    result = {}
    for path in int8.supported_paths():
        total = [0.0] * repeats
        for layer, q in zip(quant_layers, qs, strict=True):
            layer(q, path=path)
            for r, spent in enumerate(timed(lambda layer=layer, q=q, path=path: layer(q, path=path),
                                            repeats)):
                total[r] += spent
        result[path] = round(1e3 * statistics.median(total), 3)
        print(f"{name} batch {batch} path {path}: {result[path]:.2f} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--path-batch", type=int, default=16)
    parser.add_argument("--masks", choices=["random", "dnr"], default="random")
    parser.add_argument("--name", default="sparse_int8")
    args = parser.parse_args()
    results = {"machine": machine_info(), "masks": args.masks, "int8_kernel": int8.kernel_name(),
               "paths_supported": int8.supported_paths(), "models": {}}
    for name in args.models:
        layers = conv_layers(name, args.density, args.masks)
        results["models"][name] = {
            "density": args.density,
            **bench(name, layers, args.batches, args.threads, args.repeats),
            f"paths_b{args.path_batch}_t1_ms": bench_paths(name, layers, args.path_batch,
                                                           max(3, args.repeats // 2))}
    write_results(args.name, results)


if __name__ == "__main__":
    main()
