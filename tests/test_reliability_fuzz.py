"""Every file-reading entry point fed damaged, empty, wrong-type and random files (hypothesis,
bounded): one line on stderr and exit code 2, or, for a damaged file that is still valid,
acceptance; never a traceback, never a hang.

Entry points, in-process with the real console-script functions (a few subprocess cases in
test_reliability_hostile.py prove the installed entry points):
  checkpoint   dnr-compress --resume FILE; dnr-export RUN_DIR
  run.json     dnr-export RUN_DIR
  recipe       dnr-compress --config FILE; dnr-export --config FILE
  manifest     load_deployed_model (Python API); dnr-bench and dnr-verify (runtime stage)
  CSR bundle   load_deployed_model (no console script reads it)
  ONNX         dnr-bench and dnr-verify

Where a valid input would start real work (training, building the artifacts), a stub raises
`Accepted`, so each example costs milliseconds. The counts per entry point are printed at the
end of the session and kept in .pytest_cache (key dnr_reliability/fuzz_counts).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnr_deploy.cli import bench_main, compress_main, export_main, verify_main
from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress.trainer import Trainer, compress
from dnr_deploy.compress.training import CompressConfig
from dnr_deploy.deploydir.manifest import MANIFEST_NAME, ManifestError
from dnr_deploy.deploydir.names import CSR_FILE
from dnr_deploy.export import ExportConfig, export_run, load_deployed_model
from dnr_deploy.export import deploy as deploy_module
from tests.factories import write_fake_run
from tests.reliability_support import (
    COUNTS,
    Accepted,
    call_main,
    check_outcome,
    format_counts,
    record_api,
    rehash,
    time_limit,
    working_dir,
)

# Bounded: examples per test (DNR_FUZZ_EXAMPLES overrides, e.g. 300 for a long hunt), a fixed
# seed (the same inputs every run), no example database. Each call also has a time limit.
EXAMPLES = int(os.environ.get("DNR_FUZZ_EXAMPLES", 32))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
FUZZ_STAGES = settings(FUZZ, max_examples=max(EXAMPLES * 5 // 8, 1))  # two calls an example

LEAF = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
        | st.sampled_from([-1, 0, 1, 2**31, 2**63, 10**30, "", "digits", "small", "\x00"]))
JSONISH = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
TENSORS = st.builds(
    lambda dtype, shape: torch.zeros(shape, dtype=dtype),
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8]),
    st.lists(st.integers(0, 5), max_size=3))
PLAIN = JSONISH | TENSORS


# ---------------------------------------------------------------- fixtures: real files to damage

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A resumable checkpoint from real training (1 of 2 epochs, clean loss: fast), a finished
    run dir with the files dnr-compress writes (random weights: `write_fake_run`), and that
    run's deploy dir from the real dnr-export."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    root = tmp_path_factory.mktemp("reliability-base")
    with working_dir(root):
        stopped = compress(CompressConfig(out="stopped", epochs=2, stop_after=1, beta=1.0,
                                          eval_samples=20)).dir
    run_dir = root / "run"
    write_fake_run(run_dir, "irregular")
    deploy = export_run(ExportConfig(run_dir=str(run_dir), out=str(root / "deploy"),
                                     parity_samples=16)).dir
    return {"stopped": root / stopped, "run": run_dir, "deploy": deploy}


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if not COUNTS:
        return
    lines = format_counts()
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set("dnr_reliability/fuzz_counts", {k: dict(v) for k, v in COUNTS.items()})
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nbad inputs per entry point (hypothesis, this session):", *lines, sep="\n")


@pytest.fixture
def stubs(monkeypatch, tmp_path):
    """No real training and no artifact building: a valid input raises Accepted there."""
    def accept(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(Trainer, "run", accept)
    monkeypatch.setattr(deploy_module, "_build_irregular", accept)
    monkeypatch.setattr(deploy_module, "_build_dense_net", accept)
    monkeypatch.chdir(tmp_path)  # runs/LATEST of an accepted resume lands here


@pytest.fixture
def fast_build(monkeypatch, tmp_path):
    """Export builds a stand-in artifact in milliseconds; everything after the build (sizes,
    manifest, rename, summary) runs for real on the fuzzed run.json."""
    def build(source, x, reference, limit, work, *args):
        (work / "model.onnx").write_bytes(b"stand-in")
        return source.model, {"onnx_vs_torch_max_abs": 0.0, "argmax_agree": len(x)}, {}

    monkeypatch.setattr(deploy_module, "_build_irregular", build)
    monkeypatch.setattr(deploy_module, "_build_dense_net", build)
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- damage

def damaged_bytes(data, valid: bytes) -> bytes:
    """Empty, random, truncated, byte-flipped or spliced versions of `valid`."""
    kind = data.draw(st.sampled_from(["empty", "random", "truncate", "flip", "splice"]))
    if kind == "empty":
        return b""
    if kind == "random":
        return data.draw(st.binary(max_size=4096))
    if kind == "truncate":
        return valid[:data.draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        damaged = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8))):
            position = data.draw(st.integers(0, len(valid) - 1))
            damaged[position] ^= data.draw(st.integers(1, 255))
        return bytes(damaged)
    start = data.draw(st.integers(0, len(valid)))
    return valid[:start] + data.draw(st.binary(min_size=1, max_size=64)) + valid[start + 1:]


def mutated(data, obj, leaves=JSONISH):
    """A deep copy of `obj` with one nested value replaced, deleted or added (wrong types)."""
    obj = copy.deepcopy(obj)
    if not isinstance(obj, dict | list) or not obj or data.draw(st.integers(0, 9)) == 0:
        return data.draw(leaves)  # the whole document replaced
    parent = obj
    while True:
        keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        key = data.draw(st.sampled_from(keys))
        child = parent[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            parent = child
            continue
        break
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        parent[key] = data.draw(leaves)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(leaves)
    else:
        parent.append(data.draw(leaves))
    return obj


def deeply_nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "json" else "- " * depth + "x"


def damage_json_file(data, file: Path, mutations: int) -> None:
    """Rewrite a valid JSON file as one of: damaged bytes, arbitrary JSON, the valid document
    with a value changed (`mutations` times as likely as each other kind), or pathological
    JSON (deep nesting, huge numbers)."""
    kind = data.draw(st.sampled_from(["bytes", "json", *["mutate"] * mutations, "nested"]))
    if kind == "bytes":
        file.write_bytes(damaged_bytes(data, file.read_bytes()))
    elif kind == "json":
        file.write_text(json.dumps(data.draw(JSONISH)))
    elif kind == "mutate":
        file.write_text(json.dumps(mutated(data, json.loads(file.read_text()))))
    else:
        file.write_text(pathological_json(data))


def pathological_json(data) -> str:
    """JSON that parsers choke on: nesting past the recursion limit, a 5000-digit number."""
    if data.draw(st.booleans()):
        return deeply_nested(data.draw(st.sampled_from([10**4, 10**5])), "json")
    return '{"format": 1, "num_classes": ' + "9" * 5000 + "}"


# ---------------------------------------------------------------- checkpoint

def _checkpoint_bytes(data, valid_file: Path) -> bytes:
    if data.draw(st.booleans()):
        return damaged_bytes(data, valid_file.read_bytes())
    state = torch.load(valid_file, weights_only=True)
    buffer = io.BytesIO()
    torch.save(mutated(data, state, PLAIN), buffer)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_resume(data, base, stubs):
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / ckpt.CHECKPOINT_NAME
        file.write_bytes(_checkpoint_bytes(data, base["stopped"] / ckpt.CHECKPOINT_NAME))
        outcome = call_main(compress_main, ["--resume", str(file)])
        check_outcome("checkpoint: dnr-compress --resume", "dnr-compress", outcome)


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_export(data, base, stubs):
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(base["run"], run_dir)
        run = json.loads((run_dir / ckpt.RUN_JSON).read_text())
        del run["checkpoint_sha256"]  # else every change fails the hash: test the loader itself
        (run_dir / ckpt.RUN_JSON).write_text(json.dumps(run))
        file = run_dir / ckpt.CHECKPOINT_NAME
        file.write_bytes(_checkpoint_bytes(data, base["run"] / ckpt.CHECKPOINT_NAME))
        outcome = call_main(export_main, [str(run_dir), "--parity-samples", "8"])
        check_outcome("checkpoint: dnr-export", "dnr-export", outcome)
        assert not (run_dir / "deploy").exists()


# ---------------------------------------------------------------- run.json

@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_run_json_export(data, base, fast_build):
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(base["run"], run_dir)
        file = run_dir / ckpt.RUN_JSON
        damage_json_file(data, file, mutations=2)
        outcome = call_main(export_main, [str(run_dir), "--parity-samples", "8"])
        check_outcome("run.json: dnr-export", "dnr-export", outcome)
        if not outcome.accepted:
            assert not (run_dir / "deploy").exists()


# ---------------------------------------------------------------- recipes

HOSTILE_YAML = [
    "!!python/object/apply:os.system ['echo hi']",
    "epochs: !!python/object/new:builtins.int [3]",
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
    "? [1, 2]\n: 3\n",
    "epochs: 1\nepochs: 2\n",
    "%YAML 9.9\n---\nepochs: 1\n",
    "\ufeffepochs: 1\n",
]


def _recipe_text(data, valid: dict) -> str | bytes:
    kind = data.draw(st.sampled_from(["bytes", "text", "yaml", "mutate", "mutate", "hostile",
                                      "nested"]))
    if kind == "bytes":
        return damaged_bytes(data, yaml.safe_dump(valid).encode())
    if kind == "text":
        return data.draw(st.text(max_size=200))
    if kind == "yaml":
        return yaml.safe_dump(data.draw(JSONISH))
    if kind == "mutate":
        return yaml.safe_dump(mutated(data, valid))
    if kind == "hostile":
        return data.draw(st.sampled_from(HOSTILE_YAML))
    return deeply_nested(data.draw(st.sampled_from([10**3, 10**4])), "yaml")


def _write(path: Path, content: str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_recipe_compress(data, stubs):
    valid = yaml.safe_load((Path(__file__).parents[1] / "train" / "default.yaml").read_text())
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "recipe.yaml"
        _write(recipe, _recipe_text(data, valid))
        outcome = call_main(compress_main, ["--config", str(recipe)])
        check_outcome("recipe: dnr-compress --config", "dnr-compress", outcome)


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_recipe_export(data, base, stubs):
    valid = yaml.safe_load((Path(__file__).parents[1] / "export" / "default.yaml").read_text())
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "profile.yaml"
        _write(recipe, _recipe_text(data, valid))
        out = Path(folder) / "deploy"
        outcome = call_main(export_main, [str(base["run"]), "--config", str(recipe),
                                          "--out", str(out)])
        check_outcome("recipe: dnr-export --config", "dnr-export", outcome)
        assert not out.exists()


# ---------------------------------------------------------------- manifest and CSR bundle (API)

def _copy_deploy(base, folder: str) -> Path:
    deploy = Path(folder) / "deploy"
    shutil.copytree(base["deploy"], deploy)
    return deploy


def _load_cleanly(entry: str, deploy: Path) -> None:
    """load_deployed_model either works or raises ManifestError with a one-line message."""
    try:
        with time_limit(60):
            load_deployed_model(deploy)
    except ManifestError as err:
        message = str(err)
        assert message and "\n" not in message, message
        record_api(entry, accepted=False)
        return
    record_api(entry, accepted=True)


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_manifest_loader(data, base):
    with tempfile.TemporaryDirectory() as folder:
        deploy = _copy_deploy(base, folder)
        file = deploy / MANIFEST_NAME
        damage_json_file(data, file, mutations=3)
        _load_cleanly("manifest: load_deployed_model", deploy)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


ARRAYS = st.builds(
    lambda dtype, shape: np.zeros(shape, dtype=dtype),
    st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]),
    st.lists(st.integers(0, 6), max_size=3))


@pytest.mark.slow
@pytest.mark.ci
@FUZZ
@given(data=st.data())
def test_fuzz_csr_bundle_loader(data, base):
    with tempfile.TemporaryDirectory() as folder:
        deploy = _copy_deploy(base, folder)
        file = deploy / CSR_FILE
        kind = data.draw(st.sampled_from(["bytes", "arrays", "header", "header"]))
        if kind == "bytes":
            file.write_bytes(damaged_bytes(data, file.read_bytes()))
        else:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            if kind == "arrays":  # one array replaced, removed or added
                name = data.draw(st.sampled_from(sorted(arrays)))
                if data.draw(st.booleans()):
                    del arrays[name]
                else:
                    arrays[data.draw(st.sampled_from([name, "csr/x/data", "dense/x"]))] = \
                        data.draw(ARRAYS)
            else:  # the JSON header made wrong
                header = json.loads(arrays["header"].tobytes().decode())
                text = json.dumps(mutated(data, header))
                arrays["header"] = np.frombuffer(text.encode(), dtype=np.uint8)
            file.write_bytes(_npz_bytes(arrays))
        rehash(deploy, CSR_FILE)  # a consistent hostile deploy dir: the bundle itself is read
        _load_cleanly("CSR bundle: load_deployed_model", deploy)


# ---------------------------------------------------------------- dnr-bench and dnr-verify

BENCH_FAST = ["--runs", "2", "--warmup", "0", "--batch", "1"]
# --no-gate: an accepted input must not fail the gate (exit 1) by chance on 8 images, nor for
# a mutated manifest that no longer records a robust figure
VERIFY_FAST = ["--n", "8", "--steps", "1", "--queries", "10", "--examples", "0", "--no-gate"]


def _run_stages(entry: str, deploy: Path) -> None:
    for prog, main, flags in (("dnr-bench", bench_main, BENCH_FAST),
                              ("dnr-verify", verify_main, VERIFY_FAST)):
        outcome = call_main(main, [str(deploy), *flags])
        check_outcome(f"{entry}: {prog}", prog, outcome)


@pytest.mark.slow
@pytest.mark.ci
@FUZZ_STAGES
@given(data=st.data())
def test_fuzz_manifest_bench_verify(data, base):
    with tempfile.TemporaryDirectory() as folder:
        deploy = _copy_deploy(base, folder)
        file = deploy / MANIFEST_NAME
        damage_json_file(data, file, mutations=3)
        _run_stages("manifest", deploy)


def _onnx_mutation(data, model):
    """One structural change to a parsed ONNX model: what a buggy or hostile writer makes."""
    import onnx

    graph = model.graph
    kind = data.draw(st.sampled_from(["input", "op", "drop", "attribute", "dims", "opset",
                                      "ir", "external", "output"]))
    node = data.draw(st.sampled_from(list(graph.node)))
    if kind == "input":
        graph.input[0].name = data.draw(st.text(max_size=8))
    elif kind == "output":
        graph.output[0].type.tensor_type.elem_type = data.draw(st.integers(0, 30))
    elif kind == "op":
        node.op_type = data.draw(st.sampled_from(["Loop", "Custom", "Identity", "Softmax",
                                                  "ConstantOfShape", ""]))
    elif kind == "drop":
        graph.node.remove(node)
    elif kind == "attribute":
        node.attribute.append(onnx.helper.make_attribute(
            data.draw(st.sampled_from(["kernel_shape", "pads", "strides", "axis", "group"])),
            data.draw(st.lists(st.integers(-5, 2**40), max_size=4)) or 0))
        del_first = data.draw(st.booleans())
        if del_first and len(node.attribute) > 1:
            del node.attribute[0]
    elif kind == "dims":
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        tensor.dims[:] = data.draw(st.lists(st.integers(0, 2**40), max_size=4))
    elif kind == "opset":
        model.opset_import[0].version = data.draw(st.integers(0, 1000))
    elif kind == "ir":
        model.ir_version = data.draw(st.integers(0, 1000))
    else:  # weights read from a side file the manifest's sha256 does not cover
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        location = data.draw(st.sampled_from(["side.bin", "../run/checkpoint.pt",
                                              "/etc/hostname", "manifest.json"]))
        for key, value in {"location": location, "offset": "0", "length": "64"}.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model


@pytest.mark.slow
@pytest.mark.ci
@FUZZ_STAGES
@given(data=st.data())
def test_fuzz_onnx_bench_verify(data, base):
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        deploy = _copy_deploy(base, folder)
        file = deploy / "model.onnx"
        if data.draw(st.booleans()):
            file.write_bytes(damaged_bytes(data, file.read_bytes()))
        else:
            model = _onnx_mutation(data, onnx.load(str(file)))
            file.write_bytes(model.SerializeToString())
        (deploy / "side.bin").write_bytes(bytes(range(256)) * 4)
        rehash(deploy, "model.onnx")  # consistent hostile deploy dir: ONNX Runtime reads it
        _run_stages("ONNX", deploy)
