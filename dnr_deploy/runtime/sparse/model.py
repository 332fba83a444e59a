"""`SparseModel`: a list of steps (conv layers, pools, numpy ops) run on CHWN activations, in
chunks of images and threads. The front ends build the steps: `onnx_graph` from model.onnx
(what `load_sparse` uses; no PyTorch), `executor` from a PyTorch module traced with torch.fx.

A step is (key, callable, input keys): the key names the value it makes, None is the images.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dnr_deploy.deploydir import names
from dnr_deploy.runtime.sparse import codegen, native
from dnr_deploy.runtime.sparse.arena import BufferArena, lifetimes
from dnr_deploy.runtime.sparse.plan import SparseConv
from dnr_deploy.runtime.sparse.pooling import MaxPool


class NotIrregularError(ValueError):
    """The sparse runtime was asked to run a channel or dense deploy dir."""


class ChannelNormalize:
    """(x - mean) / std per channel, for a normalization that no conv could take over."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean[:, None, None, None]) / self.std[:, None, None, None]


def fold_normalization(steps: list) -> list:
    """Steps without the Normalize whose every reader is a conv (it takes the affine map
    over: SparseConv.fold_input_normalization)."""
    for index, (node, step, inputs) in enumerate(steps):
        if not isinstance(step, ChannelNormalize):
            continue
        readers = [(i, s) for i, (_, s, ins) in enumerate(steps) if node in ins]
        if readers and all(isinstance(s, SparseConv) and steps[i][2] == [node]
                           for i, s in readers):
            for i, conv in readers:
                conv.fold_input_normalization(step.mean, step.std)
                steps[i] = (steps[i][0], conv, list(inputs))
            return steps[:index] + steps[index + 1:]
    return steps


def link_convs(steps: list) -> None:
    """Let a conv or pool write straight into the planes of a conv that reads its output
    (stride 1, or strided with code that may read its input in place), and widen a conv whose
    output another conv adds as its residual (SparseConv's `into` and `match`)."""
    producers = {node: step for node, step, _ in steps if isinstance(step, (SparseConv, MaxPool))}
    for _, step, inputs in steps:
        if not isinstance(step, SparseConv):
            continue
        source = producers.get(inputs[0])
        if source is not None and source.into is None and \
                (step.stride == 1 or (step.codegen and step.in_place)):
            source.into, step.written_by = step, source
        shortcut = producers.get(inputs[1]) if len(inputs) > 1 else None
        if isinstance(shortcut, SparseConv) and shortcut.into is None:
            shortcut.match = step
    # a strided conv whose input another conv's planes hold, with no less padding (and zeros
    # there), reads it from them: a ResNet projection beside its block's first conv
    for _, step, inputs in steps:
        source = producers.get(inputs[0])
        other = source.into if source is not None else None  # the reader written into
        if isinstance(step, SparseConv) and other is not None and other is not step and \
                step.stride > 1 and step.codegen and step.in_place and \
                step.border is None and other.border is None and \
                all(mine <= theirs for mine, theirs in zip(step.pads, other.pads, strict=True)):
            step.shares = other


class SparseModel:
    """The traced steps of one model; call it on float32 NCHW images to get (N, classes).

    A batch runs in chunks of `CHUNK` images (`WIDE_CHUNK` with AVX-512, `CODEGEN_CHUNK` with
    generated code): with batch innermost, a 3x3 conv reads three input rows of every channel
    per output row (C x 3 x W x N floats), which leaves L2 beyond a few images
    (docs/notes/issue13.md).
    With `threads` > 1 the chunks are shared among threads (one thread per chunk, no barrier
    per layer), or each layer splits over OpenMP threads, or one thread runs it all: the first
    batch of each size tries all three and keeps the fastest (`_split_for`). Handing a chunk to
    a Python thread costs tens of microseconds (the default net at batch 16: 0.28 ms so, 0.16 ms
    with OpenMP inside its layers), and a parallel region waits for a late worker on a loaded
    machine, so no one rule wins everywhere.
    """

    # without AVX-512: 8 images, a pixel a vector. Measured against chunks of 4 (probe, random
    # masks at 5%, 1 thread, in turns, with the kernel's segments): VGG16 1.09-1.12x at batch 16
    # and 64, ResNet-18 1.08-1.10x (docs/decisions/2026-12-07-avx2-segments.md)
    CHUNK = 8
    WIDE_CHUNK = 8  # with AVX-512: 8 images fill a 16-float vector with two pixels
    # with generated code (AVX-512 and the emitter): 16 images, a pixel a vector, so that a
    # layer's code and weights, fetched from L3 at each chunk, serve twice the images, and no
    # input load straddles a cache line. Measured against chunks of 8 in turns (probe, DNR masks,
    # 1 thread): VGG16 21.4 against 22.7 ms at batch 16, the default net 0.18 against 0.22 ms
    # at batch 16 and 0.76 against 0.88 at 64 (chunks handed to threads may be 8: `_chunks`)
    CODEGEN_CHUNK = 16
    TRIALS = 3  # timed calls at least of each way to split threads, on the first batch of a size
    # ... and again on the RETRIAL-th batch of that size: the first trial runs right after
    # loading, often beside another runtime's workers still spinning on the second core (ONNX
    # Runtime's, in dnr-bench), which made 2 threads pick one thread at batch 1 and run 1.2x
    # slower than 1 thread where OpenMP inside the layers was 1.8x faster (ResNet-18, DNR)
    RETRIAL = 8
    # More calls, up to MAX_TRIALS, while a trial has taken less than TRIAL_SECONDS: on the
    # default net (0.1-1.3 ms a call) 3 calls each let one slow spell of the shared machine pick
    # "none" at batch 16 where "layers" ran 1.3x faster, and "images" at batch 64 where it ran
    # 1.2x slower than one thread
    MAX_TRIALS = 15
    TRIAL_SECONDS = 0.05
    # A split over threads must beat one thread's best time by 10%: on this shared 2-core
    # machine a parallel region now and then waits for a worker whose core is busy, which made
    # OpenMP in the layers of the default net run 0.5-1.0x one thread's speed at batch 16 in
    # the calls after a trial where it had been 1.1x faster (VGG16's layers split 1.8x faster)
    PARALLEL_MARGIN = 0.9
    # Chunks of images per thread are kept over OpenMP in the layers unless the layers split
    # beats them by 5%: it waits at a barrier in every layer, each a chance for a busy core to
    # stall it, and it has run slower after its trial than the trial said (VGG16 DNR at batch
    # 16: it won a side-by-side run's trial, then ran 1.51x one thread; chunks per thread won
    # both trials of a probe, by 14% and 7%, and ran 1.77x)
    IMAGES_OVER_LAYERS = 0.95
    WATCH = 5  # calls split over threads that are checked against one thread (`_watch`)
    # A batch size whose one-thread trial call took less than this stays on one thread: with
    # generated code the default net's batch 16 takes 0.2 ms, and its splits won trials, then
    # ran 0.76x one thread's speed in the side-by-side run (random masks), 0.89-1.13x in others
    MIN_SPLIT_SECONDS = 0.0005

    def __init__(self, steps: list, output: object, layers: list, threads: int = 1) -> None:
        self.steps, self.output, self.layers, self.threads = steps, output, layers, threads
        # BLAS runs only the dense-fallback and Winograd layers; finding its libraries takes
        # ~3 ms (more than a small net's whole call), so it is done once, and only when needed;
        # limiting its threads costs ~15 us a call (a seventh of the default net's batch-1
        # call), so that too happens only where a layer runs it: any batch with a dense layer,
        # chunks of 4 images or more, or of one, with a Winograd one at that size
        self._blas_always = any(layer.dense for layer, _ in layers)
        self._blas_chunks = self.winograd_layers() > 0
        self._blas_single = self.winograd_layers(batch=1) > 0
        self._blas = _blas_controller() \
            if self._blas_always or self._blas_chunks or self._blas_single else None
        self.chunk = self.CODEGEN_CHUNK if codegen.available() else \
            self.WIDE_CHUNK if native.wide_vectors() else self.CHUNK
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._splits: dict[tuple[int, int], str] = {}  # (chunks, last chunk's size) -> split
        self._calls: dict[tuple[int, int], int] = {}  # batches of that key run so far
        self._one_thread_best: dict[tuple[int, int], float] = {}  # its trial's "none" seconds
        self._recent: dict[tuple[int, int], list[float]] = {}  # its last calls split over threads
        # what _forward walks: the steps, each with whether it takes the thread count
        self._plan = [(node, step, inputs, getattr(step, "takes_threads", False))
                      for node, step, inputs in steps]
        # layers never live at once share activation buffers (arena.py)
        arena = BufferArena()
        lives = lifetimes(steps, output, lambda step: isinstance(step, SparseConv))
        for _, step, _ in steps:
            if id(step) in lives:
                step.arena, step.lives = arena, lives[id(step)]
        self._blas_free = native.available and self._blas is None
        self._convs_read_input = all(isinstance(step, SparseConv) and step.stride == 1 and
                                     inputs[0] is None and None not in inputs[1:]
                                     for _, step, inputs in steps if None in inputs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if self._blas_free and 0 < len(images) <= self.chunk and (
                self.threads == 1 or self._settled_on_one_thread(len(images))):
            # one chunk on one thread, no BLAS to limit: straight through (the steps below
            # cost ~4 us, a twelfth of the default net's batch-1 call)
            return self._forward(images, 1)
        if not native.available:  # only the numba conv kernel runs numba threads
            import numba

            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        if not len(images):  # no images: no logits, of the right width
            return np.zeros((0, self.layers[-1][0].shape[0]), np.float32)
        key = self._batch_key(len(images))
        split = self._split_for(images, key)
        start = time.perf_counter()
        logits = self._run(images, split)
        if split != "none":  # calls on one thread are not watched
            self._watch(key, time.perf_counter() - start)
        return np.concatenate(logits) if len(logits) > 1 else logits[0]

    def _settled_on_one_thread(self, batch: int) -> bool:
        """Whether batches of this size (one chunk) run on one thread for good: the trial
        and its retrial are over and chose "none" (calls split over threads are watched and
        may fall back to "none"; calls on one thread are not watched). The 2-thread engine's
        way to one thread then costs what the 1-thread engine's does: through the thread
        split it took 2.4 us longer on the default net at batch 1 (5%, probe)."""
        key = self._batch_key(batch)
        return self._splits.get(key) == "none" and self._calls.get(key, 0) > self.RETRIAL

    def _chunks(self, images: np.ndarray, split: str = "none") -> list[np.ndarray]:
        """The batch in chunks of `self.chunk` images, the last one shorter if need be; for
        the "images" split, chunks of 16 only where every thread gets one (at batch 16 on 2
        threads, one chunk of 16 split its layers over the threads 1.55x as fast as one
        thread, two chunks of 8 on two threads 1.66-1.94x)."""
        size = self.chunk
        if split == "images" and size > self.WIDE_CHUNK and len(images) < size * self.threads:
            size = self.WIDE_CHUNK
        return [images[i:i + size] for i in range(0, len(images), size)]

    def _batch_key(self, batch: int) -> tuple[int, int]:
        """(chunks, last chunk's size) of a batch: what the thread split is decided for."""
        chunks = -(-batch // self.chunk)
        return chunks, batch - (chunks - 1) * self.chunk

    def split_of(self, batch: int) -> str:
        """How batches of this size are shared among threads now ("none" before the first)."""
        return self._splits.get(self._batch_key(batch), "none")

    def _watch(self, key: tuple[int, int], seconds: float) -> None:
        """Fall back to one thread for this batch size when the median of the last WATCH calls
        split over threads took longer than one thread's best trial call. A trial can pick a
        split that the calls after it do not bear out: the default net at batch 64 picked
        OpenMP in its layers, then ran at 0.81x one thread's speed in dnr-bench's turns."""
        recent = self._recent.setdefault(key, [])
        recent.append(seconds)
        if len(recent) >= self.WATCH:
            if float(np.median(recent)) > self._one_thread_best[key]:
                self._splits[key] = "none"
            recent.clear()

    def _run(self, images: np.ndarray, split: str) -> list:
        chunks = self._chunks(images, split)
        threads = self.threads if split == "layers" else 1
        # BLAS on one thread: beside the images' threads a second BLAS thread per core only
        # competes, and inside a layer split over OpenMP its workers and OpenMP's spinning ones
        # fought for the two cores (ResNet-18 at batch 16: 236 ms, against 61 on one thread)
        size = chunks[0].shape[0]
        uses_blas = (self._blas_chunks and size % 4 == 0) or (self._blas_single and size == 1) \
            or self._blas_always
        limit = self._blas.limit(limits=1, user_api="blas") if uses_blas \
            else contextlib.nullcontext()
        with limit:
            if split == "images":
                return list(self._pool.map(self._forward, chunks, [1] * len(chunks)))
            return [self._forward(chunk, threads) for chunk in chunks]

    def _split_for(self, images: np.ndarray, key: tuple[int, int]) -> str:
        """How threads share this batch size's work: "layers" (OpenMP inside each layer),
        "images" (a chunk per thread) or "none" (one thread), whichever had the best time in
        a few trial calls on the first batch of this size and again on the RETRIAL-th, so N
        threads are never slower than one.
        Measured before this choice: VGG16 at 20% density, batch 1, took 0.51x ORT's speed at
        2 threads where 1 thread gave 1.30x (a loaded machine makes each parallel region wait)."""
        if self.threads == 1:
            return "none"
        self._calls[key] = self._calls.get(key, 0) + 1
        if key not in self._splits or self._calls[key] == self.RETRIAL:
            candidates = ["layers", "none"] + \
                (["images"] if len(self._chunks(images, "images")) > 1 else [])
            times: dict[str, list[float]] = {c: [] for c in candidates}
            for split in candidates:  # untimed: buffers of this shape and split
                self._run(images, split)
            began = time.perf_counter()
            for trial in range(self.MAX_TRIALS):
                if trial >= self.TRIALS and time.perf_counter() - began > self.TRIAL_SECONDS:
                    break
                for split in candidates:
                    start = time.perf_counter()
                    self._run(images, split)
                    times[split].append(time.perf_counter() - start)
            # each at its best: another process's work only ever slows a call down, and a
            # median taken right after another runtime's call (dnr-bench's parity check) kept
            # VGG16 at batch 1 on one thread where OpenMP in its layers runs 1.5-1.8x faster
            best = {c: min(t) * (1.0 if c == "none" else 1 / self.PARALLEL_MARGIN)
                    for c, t in times.items()}
            split = min(candidates, key=best.__getitem__)
            if split == "layers" and "images" in best and \
                    best["images"] * self.IMAGES_OVER_LAYERS <= best["layers"]:
                split = "images"
            self._splits[key] = "none" if best["none"] < self.MIN_SPLIT_SECONDS else split
            self._one_thread_best[key] = best["none"]
            self._recent.pop(key, None)
        return self._splits[key]

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

    def step_times(self, images: np.ndarray, rounds: int = 20) -> list[dict]:
        """Each step's mean milliseconds a call on `images`, on one thread, in plan order:
        where a network's time goes, to set beside another runtime's per-layer profile
        (benchmarks/deepsparse_layers.py). The plan is timed through wrappers swapped in for
        these calls only, so the calls users make carry no timing code; a call from another
        thread meanwhile would run (and be timed) through them too."""
        images = np.asarray(images, dtype=np.float32)
        chunks = self._chunks(images)
        self._run(images, "none")  # untimed: buffers of this shape
        seconds = {node: 0.0 for node, *_ in self._plan}

        def timed(node, step):
            def call(*args, **kwargs):
                start = time.perf_counter()
                result = step(*args, **kwargs)
                seconds[node] += time.perf_counter() - start
                return result
            return call

        plan = self._plan
        self._plan = [(node, timed(node, step), inputs, takes)
                      for node, step, inputs, takes in plan]
        try:
            for _ in range(rounds):
                self._run(images, "none")
        finally:
            self._plan = plan
        sizes = {id(layer): size for layer, size in self.layers}
        rows = []
        for node, step, _, _ in plan:
            row = {"step": str(node), "kind": type(step).__name__,
                   "ms": seconds[node] / rounds * 1e3}
            if isinstance(step, SparseConv) and id(step) in sizes:
                dense, nonzero = step.macs(*sizes[id(step)])
                row.update(dense_macs=dense * len(images), nonzero_macs=nonzero * len(images),
                           winograd=bool(step.runs_winograd_at(*sizes[id(step)],
                                                               batch=len(chunks[0]))))
            rows.append(row)
        return rows

    def run(self, output_names: list[str], feed: dict) -> list[np.ndarray]:
        """ONNX Runtime's `InferenceSession.run` shape, so bench times both alike."""
        return [self(feed[names.INPUT_NAME])]

    def winograd_layers(self, batch: int = 4) -> int:
        """How many layers run as Winograd on chunks of `batch` images (4 or more, or 1: a
        single image has its own threshold), at the input size the model was built for; the
        rest run the sparse kernel or the dense fallback."""
        return sum(1 for layer, size in self.layers if isinstance(layer, SparseConv) and
                   layer.runs_winograd_at(*size, batch=batch))

    def macs(self, input_shape: list[int]) -> dict:
        """Dense and nonzero multiply-adds per image of the conv and linear layers (at the
        input size the model was built for; `input_shape` is that size, kept for callers)."""
        dense = nonzero = 0
        for layer, size in self.layers:
            d, z = layer.macs(*size) if isinstance(layer, SparseConv) else layer.macs()
            dense, nonzero = dense + d, nonzero + z
        return {"dense": dense, "nonzero": nonzero}


def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
