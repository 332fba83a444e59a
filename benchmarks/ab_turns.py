"""Variants of the sparse engine on the DNR-trained deploy dirs, timed in turns: the loop that
winograd_ab.py and codegen_ab.py share (each builds its own variants and rows)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from common import pin_cpus
from dnr_masks import dnr_deploy_dir, input_shape
from side_by_side import call_runner, time_in_turns

from dnr_deploy.deploydir.names import INPUT_NAME
from dnr_deploy.runtime.session import create_session


def cells_in_turns(args, make_engines: Callable[[object, int], dict]
                   ) -> Iterator[tuple[str, int, int, dict, np.ndarray, dict, dict]]:
    """For each of `args.models` (their DNR runs, dnr_masks.py), `args.threads` and
    `args.batches`: (model, threads, batch, the engines `make_engines(deploy, threads)` made,
    the batch of random images, each engine's largest logit difference from ONNX Runtime on
    it, each engine's p50 ms over `args.runs` calls taken in turns of `args.turn`)."""
    rng = np.random.default_rng(0)
    for name in args.models:
        deploy = dnr_deploy_dir(name)
        shape = input_shape(deploy)
        for threads in args.threads:
            pin_cpus(threads)
            engines = make_engines(deploy, threads)
            session = create_session(deploy / "model.onnx", "cpu", threads)[0]
            for batch in args.batches:
                x = rng.random((batch, *shape), dtype=np.float32)
                ref = session.run(None, {INPUT_NAME: x})[0]
                parity = {k: float(np.abs(e(x) - ref).max()) for k, e in engines.items()}
                p50 = time_in_turns({k: call_runner(lambda e=e, x=x: e(x))
                                     for k, e in engines.items()}, args.runs, args.turn)
                yield name, threads, batch, engines, x, parity, p50
