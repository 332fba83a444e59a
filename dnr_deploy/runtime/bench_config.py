"""Every setting of `dnr-bench` (BenchConfig) and its validation, apart from the timing code
(bench.py re-exports both names)."""

from __future__ import annotations

from dataclasses import dataclass

from dnr_deploy.config import check_settings, option
from dnr_deploy.resources import check_threads
from dnr_deploy.runtime.runtimes import parse_placement


class BenchError(ValueError):
    """Bad input to a benchmark: options out of range, a baseline that does not fit."""


@dataclass
class BenchConfig:
    """Every setting of a benchmark; the only place their defaults are written."""

    deploy_dir: str | None = None  # None: the latest run's deploy dir
    baseline: str | None = option(
        None,
        "another deploy dir whose model.onnx is the baseline (default: this deploy dir's "
        'baseline.onnx, written by dnr-export --baseline)')
    provider: str = option("cpu", 'ONNX Runtime execution provider (cuda needs onnxruntime-gpu)')
    batch: str = option("1,64", 'comma-separated batch sizes')
    threads: int = option(1, 'threads of each runtime (ONNX Runtime intra-op, sparse kernels)',
                          '>= 1')
    runtime: str = option(
        "auto", "what runs the deployed model: ort (ONNX Runtime), sparse (the sparse engine "
        "of dnr_deploy.runtime.sparse on model.onnx's sparse weights; irregular deploy dirs "
        "only, checked against ONNX Runtime before timing) or auto (sparse for an irregular "
        "float deploy dir on the CPU whose ops it runs, else ort); the baseline always runs "
        "in ONNX Runtime")
    model: str | None = option(
        None, "kept for scripts: the sparse engine reads model.onnx and never imports the "
        "manifest's MODULE:FACTORY (it used to rebuild the model; named here, or with "
        "--trust-model-code, it was imported)")
    trust_model_code: bool = option(
        False, "import whatever MODULE:FACTORY the manifest names (runs its code)")
    warmup: int = option(10, 'untimed calls before timing each batch size', '>= 0')
    runs: int = option(100, 'timed calls per batch size', '>= 1')
    turn: int = option(
        1, 'timed calls each model makes in a row (after one untimed call) before the other '
        'takes over; 1 alternates call by call. Use 5 or so with --runtime sparse and 2+ '
        'threads: right after ONNX Runtime, whose worker threads keep spinning and whose '
        'weights evict the caches, the sparse model is timed at half its speed', '>= 1')
    seed: int = option(0, 'seed of the random input images', '[0, 2**63)')
    out: str | None = option(
        None, 'folder for bench.json and the plot (default: DEPLOY_DIR/reports)')
    verify_key: str | None = option(
        None, "public key (PEM) whose private key must have signed the deploy dir (model.sig "
        "over every file): a missing or invalid signature, or any file changed or added after "
        "signing, is refused (exit 2)")

    def batch_sizes(self) -> list[int]:
        """Raises:
            BenchError: not a comma-separated list of positive integers."""
        try:
            sizes = [int(part) for part in str(self.batch).split(",")]
        except ValueError:  # "1,,64" and "1,x" alike
            sizes = []
        if not sizes or min(sizes) < 1:
            raise BenchError(f"--batch must be positive integers separated by commas, e.g. 1,64; "
                             f"got {self.batch!r}")
        return list(dict.fromkeys(sizes))

    def validated(self) -> BenchConfig:
        """Raises:
            BenchError: an unknown provider or a count out of range."""
        try:
            parse_placement(self.runtime, self.provider)
        except ValueError as err:
            raise BenchError(str(err)) from None
        check_settings(self, BenchError)  # finite and in range: every numeric field
        self.batch_sizes()
        check_threads(self.threads, "--threads", BenchError)
        return self
