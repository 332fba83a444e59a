"""How big a network is: parameters and multiply-accumulates, one counter for every stage.

run.json (compress) and manifest.json (export) both come from `size_figures`, so they agree
for the same network. MACs are those of the Conv2d and Linear layers (the rest, batch norm,
pooling and additions, is a few percent on these nets and runs at memory speed anyway), with
two distinct meanings:

- `executed`: what the deployed graph runs with dense kernels (a channel run's shrunk network;
  an irregular run's full architecture, since ONNX Runtime densifies sparse initializers);
- `nonzero`: what a sparse kernel needs, counting only the nonzero weights.

Written with forward hooks rather than torch-pruning's counter because that counter cannot
see zeros, and one counter for both meanings keeps them comparable.
"""

from __future__ import annotations

import torch
from torch import nn

from dnr_deploy.sparsity.masks import Masks


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor, nonzero_only: bool = False) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one input (`nonzero_only`: a
    zero weight costs nothing)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        weights = int(module.weight.count_nonzero()) if nonzero_only else module.weight.numel()
        positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total += weights * positions // (module.groups if isinstance(module, nn.Conv2d) else 1)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def size_figures(full: nn.Module, deployed: nn.Module, example_input: torch.Tensor,
                 masks: Masks | None = None) -> dict:
    """{"params": {dense, deployed, compression}, "macs": {dense, executed, nonzero,
    reduction_executed, reduction_nonzero}} of a run.

    Args:
        full: the trained network at its full architecture (masked weights are zeros).
        deployed: what export ships as a dense graph (the shrunk network, or `full` itself).
        example_input: one input of the right shape.
        masks: irregular masks; their zeros are not stored, so they are not deployed params.
    """
    dense_params = sum(p.numel() for p in full.parameters())
    deployed_params = sum(p.numel() for p in deployed.parameters())
    if masks:
        deployed_params -= sum(int((~mask).sum()) for mask in masks.values())
    dense_macs = count_macs(full, example_input)
    executed = count_macs(deployed, example_input)
    nonzero = count_macs(deployed, example_input, nonzero_only=True)
    return {
        "params": {"dense": dense_params, "deployed": deployed_params,
                   "compression": dense_params / max(deployed_params, 1)},
        "macs": {"dense": dense_macs, "executed": executed, "nonzero": nonzero,
                 "reduction_executed": dense_macs / max(executed, 1),
                 "reduction_nonzero": dense_macs / max(nonzero, 1)},
    }
