"""`build_sparse_model`: a PyTorch module as sparse-runtime steps, traced with torch.fx (for
benchmarks and tests on in-memory models; a deploy dir loads through `onnx_graph`, no torch).

Conv2d -> BatchNorm2d -> ReLU chains become one `SparseConv` with the norm folded in and the
ReLU in its epilogue; everything else runs in numpy on CHWN arrays. An op without an entry is
an `UnsupportedLayerError` naming it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn

from dnr_deploy.models.registry import Normalize
from dnr_deploy.runtime.sparse.model import (
    ChannelNormalize,
    SparseModel,
    fold_normalization,
    link_convs,
)
from dnr_deploy.runtime.sparse.plan import (
    DENSE_MIN_WEIGHTS,
    DENSE_THRESHOLD,
    SparseConv,
    UnsupportedLayerError,
    _kernels,
    csr_arrays,
)
from dnr_deploy.runtime.sparse.pooling import GlobalAvgPool, MaxPool


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


def _batch_norm(norm: nn.BatchNorm2d) -> Callable:
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    shift = (norm.bias - norm.running_mean * scale).detach()
    scale, shift = (t.numpy().astype(np.float32).reshape(-1, 1, 1, 1) for t in (scale, shift))
    return lambda x: x * scale + shift


# Module type -> builder of a numpy step (Conv2d and Linear are built with their fusions).
MODULE_STEPS: dict[type, Callable[[nn.Module], Callable]] = {
    Normalize: lambda m: ChannelNormalize(m.mean.detach().numpy(), m.std.detach().numpy()),
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
    steps = fold_normalization(steps)
    link_convs(steps)
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


class SparseLinear:
    """A Linear layer on (features, N) activations: CSR, or dense above the threshold (the
    ONNX front end runs Gemm as a 1x1 SparseConv instead)."""

    takes_threads = True

    def __init__(self, weight: np.ndarray, bias: np.ndarray,
                 dense_threshold: float = DENSE_THRESHOLD) -> None:
        self.shape = weight.shape
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.nonzeros = int(np.count_nonzero(weight))
        self.density = self.nonzeros / weight.size
        self.dense = self.density > dense_threshold and weight.size >= DENSE_MIN_WEIGHTS
        if self.dense:
            self.matrix = np.ascontiguousarray(weight, dtype=np.float32)
        else:
            self.indptr, self.indices, self.values = csr_arrays(weight)

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.dense:
            return self.matrix @ x + self.bias[:, None]
        out = np.empty((self.shape[0], x.shape[1]), np.float32)
        _kernels().sparse_linear(x, self.indptr, self.indices, self.values, self.bias, out)
        return out

    def macs(self) -> tuple[int, int]:
        return math.prod(self.shape), self.nonzeros


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    norm: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a conv followed by an eval-mode batch norm, as one affine layer.

    The scale is per output channel, so a zero weight stays zero: folding keeps the mask.
    """
    weight = weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None \
        else bias.detach().double()
    if norm is not None:
        scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.detach().double()
    return weight.float().numpy(), bias.float().numpy()




def conv_layer(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, relu: bool,
               dense_threshold: float) -> SparseConv:
    """Raises:
        UnsupportedLayerError: groups, dilation, non-square kernels or strides, padding modes
            other than zeros."""
    square = lambda pair: pair[0] == pair[1]  # noqa: E731
    padding = conv.padding if not isinstance(conv.padding, str) else (None, None)
    if conv.groups != 1 or conv.dilation != (1, 1) or not square(conv.stride) or \
            not square(conv.kernel_size) or padding[0] is None or not square(padding) or \
            conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"the sparse runtime runs plain convolutions (groups 1, dilation 1, square kernel, "
            f"stride and zero padding); got {conv}; use --runtime ort")
    weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
    return SparseConv(weight, bias, conv.stride[0], padding[0], relu, dense_threshold)


def linear_layer(linear: nn.Linear, dense_threshold: float) -> SparseLinear:
    weight, bias = fold_batch_norm(linear.weight, linear.bias, None)
    return SparseLinear(weight, bias, dense_threshold)
