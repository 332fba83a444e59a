"""`load_sparse`: an irregular deploy dir as a callable on float32 NCHW numpy images.

The graph comes from torch.fx: the deploy dir is rebuilt in PyTorch with
`load_deployed_model` (weights from weights.csr.npz, every file checked against the
manifest), traced, and each node mapped to a step through the type-keyed tables below.
Conv2d -> BatchNorm2d -> ReLU chains become one `SparseConv` with the norm folded in and the
ReLU in its epilogue; everything else runs in numpy on CHWN arrays. An op without an entry is
an `UnsupportedLayerError` naming it.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import fx, nn

from dnr_deploy.deploydir import manifest, names
from dnr_deploy.export.loader import load_deployed_model
from dnr_deploy.models.registry import Normalize
from dnr_deploy.runtime.sparse import native
from dnr_deploy.runtime.sparse.plan import (
    DENSE_THRESHOLD,
    GlobalAvgPool,
    MaxPool,
    SparseConv,
    SparseLinear,
    UnsupportedLayerError,
    conv_layer,
    linear_layer,
)


class NotIrregularError(ValueError):
    """The sparse runtime was asked to run a channel or dense deploy dir."""


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _flatten(x: np.ndarray) -> np.ndarray:
    """torch.flatten(x, 1) in CHWN: (C, H, W, N) -> (C*H*W, N), the same feature order."""
    return x if x.ndim == 2 else np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _max_pool(pool: nn.MaxPool2d) -> MaxPool:
    size = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    if stride != size or pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) \
            or pool.ceil_mode:
        raise UnsupportedLayerError(f"the sparse runtime pools k x k windows with stride k and "
                                    f"no padding; got {pool}; use --runtime ort")
    return MaxPool(size)


def _avg_pool(pool: nn.AdaptiveAvgPool2d) -> GlobalAvgPool:
    if pool.output_size not in (1, (1, 1)):
        raise UnsupportedLayerError(f"the sparse runtime pools globally only; got {pool}")
    return GlobalAvgPool()


class _Normalize:
    """(x - mean) / std per channel, for a Normalize that no conv could take over."""

    def __init__(self, module: Normalize) -> None:
        self.mean = module.mean.detach().numpy().reshape(-1)
        self.std = module.std.detach().numpy().reshape(-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean[:, None, None, None]) / self.std[:, None, None, None]


def _fold_normalization(steps: list) -> list:
    """Steps without the Normalize whose every reader is a conv (it takes the affine map
    over: SparseConv.fold_input_normalization)."""
    for index, (node, step, inputs) in enumerate(steps):
        if not isinstance(step, _Normalize):
            continue
        readers = [(i, s) for i, (_, s, ins) in enumerate(steps) if node in ins]
        if readers and all(isinstance(s, SparseConv) and steps[i][2] == [node]
                           for i, s in readers):
            for i, conv in readers:
                conv.fold_input_normalization(step.mean, step.std)
                steps[i] = (steps[i][0], conv, list(inputs))
            return steps[:index] + steps[index + 1:]
    return steps


def _batch_norm(norm: nn.BatchNorm2d) -> Callable:
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    shift = (norm.bias - norm.running_mean * scale).detach()
    scale, shift = (t.numpy().astype(np.float32).reshape(-1, 1, 1, 1) for t in (scale, shift))
    return lambda x: x * scale + shift


# Module type -> builder of a numpy step (Conv2d and Linear are built with their fusions).
MODULE_STEPS: dict[type, Callable[[nn.Module], Callable]] = {
    Normalize: _Normalize,
    nn.ReLU: lambda _: _relu,
    nn.Flatten: lambda m: _flatten if (m.start_dim, m.end_dim) == (1, -1) else None,
    nn.MaxPool2d: _max_pool,
    nn.AdaptiveAvgPool2d: _avg_pool,
    nn.BatchNorm2d: _batch_norm,
}
FUNCTION_STEPS: dict[object, Callable] = {
    operator.add: np.add, torch.add: np.add, torch.relu: _relu,
    torch.nn.functional.relu: _relu, torch.flatten: _flatten,
}


# steps that take the thread count (they keep per-thread buffers or split work over threads)
LAYER_STEPS = (SparseConv, SparseLinear, MaxPool, GlobalAvgPool)


class SparseModel:
    """The traced steps of one model; call it on float32 NCHW images to get (N, classes).

    A batch runs in chunks of `CHUNK` images (`WIDE_CHUNK` with AVX-512): with batch
    innermost, a 3x3 conv reads three input rows of every channel per output row
    (C x 3 x W x N floats), which leaves L2 beyond a few images (docs/notes/issue13.md).
    With `threads` > 1 the chunks of a large model are shared among threads (one thread per
    chunk, no barrier per layer); a single chunk, or the chunks of a small model, split their
    layers over OpenMP threads instead (handing a chunk to a Python thread costs tens of
    microseconds: the default net at batch 16 took 0.28 ms so and 0.16 ms with OpenMP inside
    its layers).
    """

    CHUNK = 4
    WIDE_CHUNK = 8  # with AVX-512: 8 images fill a 16-float vector with two pixels
    POOL_MIN_MACS = 8_000_000  # nonzero multiply-adds a chunk needs to go to a thread of its own

    def __init__(self, steps: list, output: fx.Node, layers: list, threads: int = 1) -> None:
        self.steps, self.output, self.layers, self.threads = steps, output, layers, threads
        # BLAS runs only the dense-fallback layers; finding its libraries takes ~3 ms (more
        # than a small net's whole call), so it is done once, and only when needed
        self._blas = ThreadpoolController() if any(layer.dense for layer, _ in layers) \
            else None
        self.chunk = self.WIDE_CHUNK if native.wide_vectors() else self.CHUNK
        chunk_macs = self.macs([])["nonzero"] * self.chunk
        self._pool = ThreadPoolExecutor(threads) \
            if threads > 1 and chunk_macs >= self.POOL_MIN_MACS else None
        # what _forward walks: the steps, each with whether it takes the thread count
        self._plan = [(node, step, inputs, isinstance(step, LAYER_STEPS))
                      for node, step, inputs in steps]
        self._convs_read_input = all(isinstance(step, SparseConv) and step.stride == 1 and
                                     inputs[0] is None and None not in inputs[1:]
                                     for _, step, inputs in steps if None in inputs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if not native.available:  # only the numba conv kernel runs numba threads
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        limit = self._blas.limit(limits=1, user_api="blas") if self._blas \
            else contextlib.nullcontext()
        chunks = [images[i:i + self.chunk] for i in range(0, len(images), self.chunk)]
        if not chunks:  # no images: no logits, of the right width
            return np.zeros((0, self.layers[-1][0].shape[0]), np.float32)
        with limit:
            if self._pool is None or len(chunks) == 1:
                logits = [self._forward(chunk, self.threads) for chunk in chunks]
            else:
                logits = list(self._pool.map(self._forward, chunks, [1] * len(chunks)))
        return np.concatenate(logits) if len(logits) > 1 else logits[0]

    def _forward(self, images: np.ndarray, threads: int) -> np.ndarray:
        # a conv copies its input into its own planes anyway: the images' transposed view
        # will do for it; other steps get batch-innermost memory
        x = images.transpose(1, 2, 3, 0)
        if not self._convs_read_input:
            x = np.ascontiguousarray(x)
        values: dict = {None: x}
        for node, step, inputs, takes_threads in self._plan:
            args = [values[i] for i in inputs]
            values[node] = step(*args, threads=threads) if takes_threads else step(*args)
        logits = values[self.output]
        return np.array(logits.reshape(logits.shape[0], -1).T, order="C", copy=True)

    def run(self, output_names: list[str], feed: dict) -> list[np.ndarray]:
        """ONNX Runtime's `InferenceSession.run` shape, so bench times both alike."""
        return [self(feed[names.INPUT_NAME])]

    def macs(self, input_shape: list[int]) -> dict:
        """Dense and nonzero multiply-adds per image of the conv and linear layers (at the
        input size the model was built for; `input_shape` is that size, kept for callers)."""
        dense = nonzero = 0
        for layer, size in self.layers:
            d, z = layer.macs(*size) if isinstance(layer, SparseConv) else layer.macs()
            dense, nonzero = dense + d, nonzero + z
        return {"dense": dense, "nonzero": nonzero}


def build_sparse_model(model: nn.Module, input_shape: list[int], threads: int = 1,
                       dense_threshold: float = DENSE_THRESHOLD) -> SparseModel:
    """Trace `model` (eval mode) with torch.fx and map its nodes to sparse-runtime steps.

    Raises:
        UnsupportedLayerError: an op the runtime has no step for (named).
        ValueError: a model in training mode (batch norm would use batch statistics).
    """
    if model.training:
        raise ValueError("build_sparse_model folds batch norm's running statistics: pass an "
                         "eval-mode model (model.eval())")
    traced = fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(traced.named_modules())
    shapes = _input_sizes(traced, input_shape)
    steps, alias, layers, pending = [], {}, [], {}
    resolve = lambda a: alias.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = resolve(node.args[0])
            break
        if node in pending:  # a conv whose fused chain ends here (after its residual's input)
            conv, step, inputs = pending.pop(node)
            steps.append((conv, step, [_input(resolve(a)) for a in inputs]))
            continue
        if node in alias:
            continue
        inputs = [resolve(a) for a in node.args]
        if node.op == "call_module" and type(modules[node.target]) in (nn.Identity, nn.Dropout) \
                and not node.kwargs:  # no step: its readers read its input (eval mode)
            alias[node] = inputs[0]
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            last, norm, residual, relu = _fusable(node, modules, claimed=alias)
            step = conv_layer(modules[node.target], norm, relu, dense_threshold)
            layers.append((step, shapes[node]))
            for fused in _chain(node, last):
                alias[fused] = node
            reads = inputs[:1] + ([residual] if residual else [])
            if last is node:
                steps.append((node, step, [_input(a) for a in reads]))
            else:  # emitted where the chain ends: a residual may be computed after the conv
                pending[last] = (node, step, reads)
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            step = linear_layer(modules[node.target], dense_threshold)
            layers.append((step, None))
        else:
            step = _simple_step(node, modules)
        steps.append((node, step, [_input(a) for a in inputs if isinstance(a, fx.Node)]))
    steps = _fold_normalization(steps)
    _link_convs(steps)
    return SparseModel(steps, output, layers, threads)


class _Tracer(fx.Tracer):
    """Keeps every module with a step of its own (Normalize included) as one node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in MODULE_STEPS or super().is_leaf_module(module, qualified_name)


def _simple_step(node: fx.Node, modules: dict) -> Callable:
    step = None
    if node.op == "call_module":
        module = modules[node.target]
        builder = MODULE_STEPS.get(type(module))
        step = builder(module) if builder else None
        what = f"module {node.target!r} ({type(module).__name__})"
    elif node.op == "call_function":
        step = FUNCTION_STEPS.get(node.target)
        if node.target is torch.flatten and node.args[1:] not in ((1,), ()):
            step = None
        what = f"function {getattr(node.target, '__name__', node.target)}"
    else:
        what = f"{node.op} {node.target!r}"
    if node.kwargs:  # keyword arguments (start_dim=..., inplace=...) are not interpreted
        step, what = None, f"{what} with keyword arguments {sorted(node.kwargs)}"
    if step is None:
        raise UnsupportedLayerError(
            f"the sparse runtime has no step for {what}; supported modules: "
            f"{', '.join(t.__name__ for t in (nn.Conv2d, nn.Linear, *MODULE_STEPS))}; "
            "use --runtime ort")
    return step


def _fusable(conv: fx.Node, modules: dict, claimed: dict
             ) -> tuple[fx.Node, nn.BatchNorm2d | None, fx.Node | None, bool]:
    """The last node of conv -> [BatchNorm2d] -> [+ residual] -> [ReLU] when each link has one
    user and no other conv's chain took it (both sides of an addition can end in a conv),
    with the norm, the residual's node and whether a ReLU ends it."""
    last, norm, residual, relu = conv, None, None, False

    def next_user(node: fx.Node) -> fx.Node | None:
        user = _only_user(node)
        return None if user in claimed else user

    user = next_user(last)
    if user is not None and user.op == "call_module" and \
            isinstance(modules[user.target], nn.BatchNorm2d):
        last, norm = user, modules[user.target]
        user = next_user(last)
    if user is not None and user.op == "call_function" and \
            user.target in (operator.add, torch.add) and len(user.args) == 2 and \
            not user.kwargs and all(isinstance(a, fx.Node) for a in user.args) and \
            user.args[0] is not user.args[1]:
        residual = user.args[1] if user.args[0] is last else user.args[0]
        last = user
        user = next_user(last)
    if user is not None and ((user.op == "call_module" and
                              isinstance(modules[user.target], nn.ReLU)) or
                             (user.op == "call_function" and
                              user.target in (torch.relu, torch.nn.functional.relu))):
        last, relu = user, True
    return last, norm, residual, relu


def _input(node: fx.Node) -> fx.Node | None:
    """A step's input: a node's value, or None for the model's input."""
    return None if node.op == "placeholder" else node


def _link_convs(steps: list) -> None:
    """Let a conv or pool write straight into the planes of a stride-1 conv that reads its
    output, and widen a conv whose output another conv adds as its residual (SparseConv's
    `into` and `match`)."""
    producers = {node: step for node, step, _ in steps if isinstance(step, (SparseConv, MaxPool))}
    for _, step, inputs in steps:
        if not isinstance(step, SparseConv):
            continue
        source = producers.get(inputs[0])
        if source is not None and source.into is None and step.stride == 1:
            source.into = step
        shortcut = producers.get(inputs[1]) if len(inputs) > 1 else None
        if isinstance(shortcut, SparseConv) and shortcut.into is None:
            shortcut.match = step


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(first: fx.Node, last: fx.Node):
    node = first
    while node is not last:
        node = _only_user(node)
        yield node


def _input_sizes(traced: fx.GraphModule, input_shape: list[int]) -> dict:
    """(height, width) of the input of every Conv2d node, from one shape-propagating run."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(traced).propagate(torch.zeros(1, *input_shape))
    return {node: tuple(node.args[0].meta["tensor_meta"].shape[-2:])
            for node in traced.graph.nodes if node.op == "call_module" and
            isinstance(traced.get_submodule(node.target), nn.Conv2d)}


def load_sparse(deploy_dir: str | Path, threads: int = 1,
                dense_threshold: float = DENSE_THRESHOLD,
                verify_key: str | Path | None = None, model_spec: str | None = None,
                trust_model_code: bool = False) -> SparseModel:
    """An irregular deploy dir as a callable: float32 NCHW images in [0, 1] -> (N, classes).
    `model_spec`, `trust_model_code`: as `load_deployed_model`'s `model` and
    `trust_model_code` (a manifest's MODULE:FACTORY is imported only when named or trusted).

    Raises:
        NotIrregularError: a channel or dense deploy dir (nothing sparse to run).
        ManifestError: not a deploy dir, or a file that fails its sha256 (or, with
            `verify_key`, a deploy dir without a valid signature: `load_deployed_model`).
        UnsupportedLayerError: an op the runtime has no step for.
    """
    info = manifest.load_manifest(Path(deploy_dir))
    if names.CSR_FILE not in info["files"]:
        raise NotIrregularError(
            f"the sparse runtime runs irregular deploy dirs; {str(deploy_dir)!r} is a "
            f"{info.get('granularity') or 'dense'} export without {names.CSR_FILE}: "
            "use --runtime ort")
    model = load_deployed_model(deploy_dir, verify_key=verify_key, model=model_spec,
                                trust_model_code=trust_model_code)
    return build_sparse_model(model, list(info["input_shape"]), threads, dense_threshold)
