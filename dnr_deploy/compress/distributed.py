"""torchrun support: process-group setup, rank-0-only side effects, and agreement checks.

Under torchrun (WORLD_SIZE > 1 in the environment) every rank trains a DistributedDataParallel
replica on its shard of each global batch; gradients are averaged by DDP, so replicas stay
identical. Masks are decided by every rank from that identical state and then compared: a rank
whose masks differ is a hard error (`RankDisagreement`), never silent drift.
"""

from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class RankDisagreement(RuntimeError):
    """Ranks that should hold identical state do not."""


class JobTerminated(Exception):
    """SIGTERM arrived: torchrun stops the surviving ranks this way when one rank fails."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise JobTerminated(f"signal {signal.Signals(signum).name}")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, kind: str) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if kind == "cuda" else torch.device("cpu")


def init_distributed(device_kind: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the torchrun job described by the environment, if any.

    nccl on CUDA, gloo on CPU. A single process (no WORLD_SIZE, or 1) needs no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    context = DistContext(int(os.environ["RANK"]), world_size,
                          int(os.environ.get("LOCAL_RANK", "0")))
    # Turn torchrun's SIGTERM (sent when another rank died) into an exception the loop reports.
    signal.signal(signal.SIGTERM, _raise_terminated)
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return context


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(context: DistContext, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the run dir, or the error rank 0 hit)."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(context: DistContext, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of `tensors`: equal only if bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_agreement(context: DistContext, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise RankDisagreement unless every rank holds bit-identical `tensors`."""
    if not context.enabled:
        return
    prints = gather_objects(context, fingerprint(tensors))
    differing = [rank for rank, value in enumerate(prints) if value != prints[0]]
    if differing:
        raise RankDisagreement(
            f"{what} on rank(s) {differing} differ from rank 0's; stopping instead of drifting"
        )


def mean_across_ranks(
    context: DistContext, values: dict[str, float], device: torch.device
) -> dict[str, float]:
    """Average of per-rank figures (each rank's mean loss over its shard)."""
    if not context.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / context.world_size for k, v in zip(keys, tensor, strict=True)}
