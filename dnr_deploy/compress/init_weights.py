"""`--init-from FILE`: start a run from pretrained weights instead of a random init.

The file is data, never code: safetensors, or a torch state_dict read with weights_only=True
(a dnr-compress checkpoint.pt works too: its "model" entry is used). Tensors are matched by
name and shape, with or without the leading "1." that puts every network behind the run's
normalization (so torchvision's own state_dicts match) and without DDP's "module.". The
run's normalization is never overwritten: it is measured on this run's data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from dnr_deploy.compress.config import ConfigError
from dnr_deploy.models.registry import Normalize


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch state_dict (weights_only=True).

    Raises:
        ConfigError: missing, unreadable, or holding no name -> tensor table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-from {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  pickle, safetensors and zip errors all mean "bad file"
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise ConfigError(f"--init-from {str(path)!r} is not a safetensors file or a "
                          f"state_dict readable with weights_only=True: {reason}") from None
    for key in ("model", "state_dict"):  # a checkpoint that wraps its weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    tensors = {str(k).removeprefix("module."): v for k, v in (state or {}).items()
               if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ConfigError(f"--init-from {str(path)!r} holds no name -> tensor table")
    return tensors


def load_initial_weights(model: nn.Module, path: str | Path, quiet: bool = False) -> dict:
    """Copy every tensor of `path` whose name and shape fit into `model`, in place.

    Returns:
        {"file", "loaded", "missing" (model tensors the file lacks), "skipped" (same name,
        other shape, with both shapes), "unused" (count of file tensors that fit nothing)};
        the same in one line on stderr unless `quiet`.

    Raises:
        ConfigError: an unreadable file, or one none of whose tensors fit the model.
    """
    theirs = read_state_dict(path)
    normalization = {f"{name}.{buffer}" for name, module in model.named_modules()
                     if isinstance(module, Normalize) for buffer in ("mean", "std")}
    own = {k: v for k, v in model.state_dict().items() if k not in normalization}
    loaded: dict[str, torch.Tensor] = {}
    missing, skipped, used = [], [], set()
    for name, tensor in own.items():
        body = name.split(".", 1)[1] if "." in name else name
        match = name if name in theirs else body if body in theirs else None
        if match is None:
            missing.append(name)
        elif tuple(theirs[match].shape) != tuple(tensor.shape):
            skipped.append(f"{name} ({_shape(theirs[match])} in the file, {_shape(tensor)} here)")
            used.add(match)
        else:
            loaded[name] = theirs[match].to(tensor.dtype)
            used.add(match)
    if not loaded:
        raise ConfigError(f"--init-from {str(path)!r}: none of its {len(theirs)} tensors fits "
                          f"the model by name and shape (first: {next(iter(theirs))!r}; the "
                          f"model's: {next(iter(own), '')!r})")
    model.load_state_dict(loaded, strict=False)
    report = {"file": str(path), "loaded": len(loaded), "of": len(own), "missing": missing,
              "skipped": skipped, "unused": len(set(theirs) - used)}
    if not quiet:
        print(f"--init-from {str(path)!r}: loaded {len(loaded)} of {len(own)} tensors; missing "
              f"{len(missing)}{_first(missing)}; skipped (other shape) {len(skipped)}"
              f"{_first(skipped)}; unused in the file {report['unused']}", file=sys.stderr)
    return report


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _first(names: list[str]) -> str:
    return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
