"""Activation buffers shared by the layers of one model whose lives in a call do not overlap.

Each conv keeps its input planes (zero-bordered) and, where it writes no other conv's planes,
its output for the life of the model. Layers that are never live at once share a buffer
instead: ResNet-18's activation buffers at chunks of 16 images took 52.9 MB instead of 67.6
(VGG16, whose convs change geometry at almost every layer, 26.0 instead of 26.5). Speed did
not change measurably (docs/decisions/2026-12-06-shared-buffers.md): this is for the memory of
the machines users deploy to.

A buffer's life is a closed range of plan steps: from the step that writes it to the last step
that reads it (`lifetimes`). Two requests share a buffer only if they ask for the same key (a
conv's planes: the same geometry and padding, so the zero borders one leaves are the ones the
other needs) and their lives are disjoint.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable

import numpy as np

Life = tuple[int, int]


class BufferArena:
    """Buffers handed out per calling thread and call signature (a chunk's size and thread
    count: calls of different signatures never run at once on a thread)."""

    def __init__(self) -> None:
        # (thread, signature) -> [(key, buffer, lives it serves)]
        self._pools: dict[tuple, list[tuple[Hashable, np.ndarray, list[Life]]]] = {}

    def take(self, signature: Hashable, key: Hashable, size: int, life: Life | None,
             make: Callable[[int], np.ndarray]) -> np.ndarray:
        """A buffer of `size` floats for `key`, shared with earlier requests of the same key
        whose lives are disjoint from `life`; `make(size)` makes a new one (zeroed where the
        caller needs zero borders). Without a life (unknown), always a new buffer."""
        if life is None:
            return make(size)
        pool = self._pools.setdefault((threading.get_ident(), signature), [])
        for entry_key, buffer, lives in pool:
            if entry_key == key and buffer.size == size and \
                    all(life[1] < start or end < life[0] for start, end in lives):
                lives.append(life)
                return buffer
        buffer = make(size)
        pool.append((key, buffer, [life]))
        return buffer


def lifetimes(steps: list, output: object, is_conv: Callable[[object], bool]
              ) -> dict[int, tuple[Life, Life]]:
    """For each conv (by id) that appears once in `steps` ((node, step, input nodes), in
    call order): the life of its input planes and of its own output buffer.

    The planes are written by the step that writes straight into them (a step whose `into`
    is this conv), else by the conv itself (a copy), and read until the last reader of that
    writer's value (it is a view of the planes). A step that is not a conv may return a view
    of its input (a reshape, a split), so a value lives as long as anything computed from it
    through such steps. The model's output lives to the end of the call."""
    readers: dict[object, list[int]] = {}
    for i, (_, _, inputs) in enumerate(steps):
        for node in inputs:
            readers.setdefault(node, []).append(i)
    # the last step reading each step's value or a value that may be a view of it: readers
    # come later in the plan, so a walk from the end has their lives ready
    last: dict[object, int] = {}
    for i in range(len(steps) - 1, -1, -1):
        node = steps[i][0]
        last[node] = len(steps) if node == output else i
        for j in readers.get(node, []):
            last[node] = max(last[node], j if is_conv(steps[j][1]) else last[steps[j][0]])
    seen = Counter(id(step) for _, step, _ in steps)
    writers = {id(step.into): i for i, (_, step, _) in enumerate(steps)
               if getattr(step, "into", None) is not None}
    lives = {}
    for k, (node, step, _) in enumerate(steps):
        if not is_conv(step) or seen[id(step)] > 1:
            continue
        writer = writers.get(id(step))
        if writer is not None and seen[id(steps[writer][1])] > 1:
            continue  # written at more than one step
        planes = (k, k) if writer is None else (writer, max(k, last[steps[writer][0]]))
        lives[id(step)] = (planes, (k, last[node]))
    return lives
