"""Activation buffers shared by layers never live at once (runtime/sparse/arena.py): lives
from the plan, sharing only where lives are disjoint, and networks whose values live long
(skips, concatenations, views) computing what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from dnr_deploy.runtime.sparse import build_from_onnx
from dnr_deploy.runtime.sparse.arena import BufferArena, lifetimes
from dnr_deploy.runtime.sparse.plan import SparseConv
from tests.test_sparse_onnx_ops import CHANS, SIZE, Graph, assert_matches_ort


class Conv:
    """A stand-in for a conv step: only `into` matters to `lifetimes`."""

    def __init__(self) -> None:
        self.into = None


def is_conv(step: object) -> bool:
    return isinstance(step, Conv)


def test_lives_follow_writers_readers_and_views():
    """a -> b (a writes into b's planes) -> view of b's output -> c, d reads a's output late."""
    a, b, c, d = Conv(), Conv(), Conv(), Conv()
    a.into = b
    steps = [("a", a, [None]), ("b", b, ["a"]), ("view", object(), ["b"]),
             ("c", c, ["view"]), ("d", d, ["c", "a"])]
    lives = lifetimes(steps, "d", is_conv)
    # b's planes hold a's output: written at step 0, read by b (1) and by d (4)
    assert lives[id(b)][0] == (0, 4)
    # b's own output is read through a view by c (3)
    assert lives[id(b)][1] == (1, 3)
    assert lives[id(a)][0] == (0, 0)  # copied in by a itself
    assert lives[id(d)][1] == (4, 5)  # the model's output: to the end of the call


def test_a_step_run_twice_gets_no_shared_buffers():
    a = Conv()
    steps = [("x", a, [None]), ("y", a, ["x"])]
    assert lifetimes(steps, "y", is_conv) == {}


def test_buffers_are_shared_only_between_disjoint_lives_of_one_key():
    arena = BufferArena()
    take = lambda key, life: arena.take((8, 1), key, 100, life, np.zeros)  # noqa: E731
    first = take("k", (0, 2))
    assert take("k", (3, 5)) is first  # after it
    assert take("k", (2, 4)) is not first  # overlaps at step 2
    assert take("other", (6, 7)) is not first  # another key (geometry)
    assert arena.take((16, 1), "k", 100, (6, 7), np.zeros) is not first  # another signature
    assert take("k", None) is not first  # no life known: a buffer of its own


def long_lived_net() -> Graph:
    """Same-geometry convs whose values are read far downstream: a skip over three convs, a
    concatenation of the first conv's output with the last's, and a reshape (a view) of an
    early value read at the end."""
    g = Graph()
    first = g.op("Relu", [g.conv("input", CHANS, CHANS, pads=[1] * 4)])[0]
    flat = g.op("Reshape", [first, g.const([0, -1], np.int64)])[0]
    x = first
    for _ in range(3):
        x = g.op("Relu", [g.conv(x, CHANS, CHANS, pads=[1] * 4)])[0]
    x = g.op("Add", [x, first])[0]
    x = g.conv(g.op("Concat", [first, x], axis=1)[0], CHANS, 2 * CHANS, pads=[1] * 4)
    x = g.op("Relu", [g.conv(x, CHANS, CHANS, pads=[1] * 4)])[0]
    back = g.op("Reshape", [flat, g.const([0, CHANS, SIZE, SIZE], np.int64)])[0]
    for i, init in enumerate(g.inits):  # weights scaled so that logits stay near 1 (their
        value = numpy_helper.to_array(init)  # rounding then stays within the check's limit)
        if value.ndim == 4:
            g.inits[i] = numpy_helper.from_array(value * np.float32(0.2), init.name)
    return g.model(g.op("Add", [x, back])[0])


@pytest.mark.parametrize("batch", [3, 16])  # chunks of 4 or 8 images; one of 16
def test_long_lived_values_survive_shared_buffers(batch):
    model = long_lived_net()
    assert_matches_ort(model, batch=batch)
    engine = build_from_onnx(model, [CHANS, SIZE, SIZE])
    engine(np.zeros((batch, CHANS, SIZE, SIZE), np.float32))
    convs = [step for _, step, _ in engine.steps if isinstance(step, SparseConv)]
    assert all(conv.arena is convs[0].arena for conv in convs)
    buffers = {id(buffer) for pool in convs[0].arena._pools.values() for _, buffer, _ in pool}
    served = sum(len(lives) for pool in convs[0].arena._pools.values() for _, _, lives in pool)
    assert len(buffers) < served  # some buffers were shared


def test_threads_and_splits_keep_their_own_buffers():
    """Chunks on two threads each take buffers of their own thread's pools; the 2-thread
    engine's logits equal the 1-thread engine's."""
    model = long_lived_net()
    x = np.random.default_rng(2).random((32, CHANS, SIZE, SIZE), dtype=np.float32)
    want = build_from_onnx(model, [CHANS, SIZE, SIZE])(x)
    engine = build_from_onnx(model, [CHANS, SIZE, SIZE], threads=2)
    for _ in range(4):  # through the thread-split trial and past it
        np.testing.assert_allclose(engine(x), want, rtol=1e-5, atol=1e-5)
