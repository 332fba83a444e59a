"""manifest.json of a deploy dir: what was deployed, from which run, and the hash of every file.

Later stages (dnr-bench, dnr-verify, the loader) read a deploy dir through `load_manifest` and
`verify_files`, so a deploy dir copied to another machine is checked before it is trusted.

Fields (DESIGN.md section 6): "format", "source_run" {dir, checkpoint_sha256, run_json_sha256},
"model" {name, num_classes, in_chans}, "input_shape", "input_range", "num_classes", "mean",
"std", "class_names", "granularity", "export_format", "threat_model", "accuracy" (the run's
training-side figures), "robustness" (the AutoAttack-grade evaluation: images, protocol, per
attack), "dataset" {name, split, data_dir; an image folder adds image_size, channels, mean, std,
class_names, test_from, split_seed, test_fraction, skip_bad_images}, "density", "params"
{dense, deployed, compression}, "macs"
{dense, executed, nonzero, reduction_executed, reduction_nonzero} (`sizes.size_figures`, as in
run.json), "sparse_initializers" (irregular ONNX), "onnx_sizes" {file: {params, macs}} (counted on
each ONNX file itself, `graph_sizes`; checked when a deploy dir is opened), "files" {name:
{bytes, sha256}}, "parity" {onnx_vs_torch_max_abs, argmax_agree, n_images; channel runs add
shrunk_vs_masked_max_abs, irregular ones csr_round_trip_exact; --baseline adds
baseline_vs_torch_max_abs}, "quantization" (--quantize int8: settings, reduce_range and why,
the int8-vs-reference drift, clean accuracy float and int8), "opset", "versions", "export_seconds".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnr_deploy.compress.checkpoint import CHECKPOINT_NAME, RUN_JSON
from dnr_deploy.deploydir.names import MANIFEST_NAME, UNLISTED_ENTRIES
from dnr_deploy.files import (
    are_numbers,
    artifact_file,
    is_int_in,
    is_number,
    read_json_object,
    sha256_of,
    write_json,
)

MANIFEST_FORMAT = "dnr-deploy/deploy/1"
REQUIRED_KEYS = ("format", "model", "input_shape", "num_classes", "granularity", "files")


class ManifestError(ValueError):
    """A deploy dir whose manifest is missing, unreadable, or does not match its files."""


def file_entries(deploy_dir: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} for every file in `deploy_dir` except the manifest."""
    return {
        file.name: {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
        for file in sorted(Path(deploy_dir).iterdir())
        if file.is_file() and file.name != MANIFEST_NAME
    }


def build_manifest(
    run_dir: Path, run: dict, figures: dict, export_format: str, opset: int
) -> dict:
    """The manifest of an export of `run_dir` (whose run.json is `run`), without "files".

    Args:
        run_dir: the source run dir (hashed here: its checkpoint and run.json).
        run: its run.json.
        figures: "params", "macs", "parity", "export_seconds" of this export, and for a sparse
            ONNX "sparse_initializers" (how many weights became sparse tensors).
        export_format: "onnx" or "csr".
        opset: the ONNX opset of the graphs.
    """
    import onnx
    import onnxruntime
    import torch
    import torch_pruning

    copied = ("model", "input_shape", "input_range", "num_classes", "class_names", "mean", "std",
              "granularity",
              "threat_model", "accuracy", "robustness", "density")
    return {
        "format": MANIFEST_FORMAT,
        "source_run": {
            "dir": str(Path(run_dir).resolve()),
            "checkpoint_sha256": sha256_of(Path(run_dir) / CHECKPOINT_NAME),
            "run_json_sha256": sha256_of(Path(run_dir) / RUN_JSON),
        },
        **{key: run.get(key) for key in copied},
        # what verify needs to score the artifact without the source run: a deploy dir
        # copied alone to another machine verifies (its data folder may be named there)
        # (an image folder's record adds its image size, channels, classes and split)
        "dataset": run.get("dataset") or {"name": (run.get("config") or {}).get("dataset"),
                                          "split": "test",
                                          "data_dir": (run.get("config") or {}).get("data_dir")},
        "export_format": export_format,
        "params": figures["params"],
        "macs": figures["macs"],
        "parity": figures["parity"],
        **{key: figures[key] for key in ("sparse_initializers", "quantization", "onnx_sizes")
           if key in figures},
        "opset": opset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__,
                     "torch_pruning": torch_pruning.__version__},
        "export_seconds": figures["export_seconds"],
    }


def write_manifest(deploy_dir: Path, manifest: dict) -> None:
    """Write `manifest` with a fresh "files" table of everything already in `deploy_dir`."""
    write_json(Path(deploy_dir) / MANIFEST_NAME, {**manifest, "files": file_entries(deploy_dir)})


def load_manifest(deploy_dir: str | Path) -> dict:
    """The manifest of a deploy dir (the files are not checked: see `verify_files`).

    Raises:
        ManifestError: no such dir, no manifest.json, invalid JSON, or another format.
    """
    deploy_dir = Path(deploy_dir)
    file = artifact_file(deploy_dir, MANIFEST_NAME, ManifestError)
    if not file.is_file():
        what = "a folder" if deploy_dir.is_dir() else "there"
        raise ManifestError(
            f"{str(deploy_dir)!r} is not a deploy dir (no {MANIFEST_NAME} {what}); "
            "make one with dnr-export"
        )
    manifest = read_json_object(file, "a manifest", ManifestError)
    if manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format")
        raise ManifestError(
            f"{str(file)!r} has format {found!r}, expected {MANIFEST_FORMAT!r}; "
            "re-export the run with this version of dnr-export"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{str(file)!r} lacks {', '.join(missing)}; re-export the run")
    for key, valid in _FIELD_TYPES.items():
        if key not in manifest or (manifest[key] is None and key not in REQUIRED_KEYS):
            continue  # optional entries may be null (a run.json without them)
        if not valid(manifest[key]):
            raise ManifestError(f"{str(file)!r} is damaged: {key!r} is "
                                f"{json.dumps(manifest[key])[:60]}; re-export the run")
    return manifest


# Bounds beyond any model this project builds (ImageNet-21k has 21,841 classes): a manifest
# is read before any hash check can vouch for it, and these figures size tensors and inputs.
MAX_CLASSES, MAX_CHANNELS, MAX_SIDE = 100_000, 64, 4096
# One image of at most 2**24 values (64 MiB of float32; 3 x 2364 x 2364): each side may be
# large, not all at once ([64, 4096, 4096] is 4 GiB an image).
MAX_INPUT_ELEMENTS = 2**24






def _file_entry(name: Any, entry: Any) -> bool:
    """A plain file name inside the deploy dir (no path, no "..") with its size and sha256."""
    plain = (isinstance(name, str) and name not in ("", ".", "..", MANIFEST_NAME)
             and "/" not in name and "\\" not in name and "\x00" not in name)
    return plain and isinstance(entry, dict) and is_int_in(entry.get("bytes"), 0, 2**62) \
        and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64




# The types of the entries the loader, dnr-bench and dnr-verify read.
_FIELD_TYPES: dict[str, Callable[[Any], bool]] = {
    "files": lambda v: isinstance(v, dict) and all(_file_entry(k, e) for k, e in v.items()),
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
    and is_int_in(v.get("num_classes"), 1, MAX_CLASSES)
    and is_int_in(v.get("in_chans"), 1, MAX_CHANNELS),
    "input_shape": lambda v: isinstance(v, list) and len(v) == 3
    and is_int_in(v[0], 1, MAX_CHANNELS) and is_int_in(v[1], 1, MAX_SIDE)
    and is_int_in(v[2], 1, MAX_SIDE) and v[0] * v[1] * v[2] <= MAX_INPUT_ELEMENTS,
    "num_classes": lambda v: is_int_in(v, 1, MAX_CLASSES),
    "class_names": lambda v: isinstance(v, list) and len(v) <= MAX_CLASSES
    and all(isinstance(n, str) for n in v),
    "granularity": lambda v: isinstance(v, str),
    "mean": are_numbers,
    "std": lambda v: are_numbers(v, positive=True),
    "input_range": lambda v: are_numbers(v) and len(v) == 2,
    "threat_model": lambda v: isinstance(v, dict) and isinstance(v.get("norm", ""), str)
    and (v.get("eps") is None or is_number(v["eps"])),
    "accuracy": lambda v: isinstance(v, dict)  # fractions that feed verify's gate
    and all(is_number(x) and 0 <= x <= 1 for x in v.values()),
    "dataset": lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
    and (v.get("data_dir") is None or isinstance(v["data_dir"], str)),
    "robustness": lambda v: (isinstance(v, dict) and is_int_in(v.get("images"), 0, 10**9)
                                          and isinstance(v.get("protocol"), dict)),
    "params": lambda v: isinstance(v, dict) and all(map(is_number, v.values())),
    "macs": lambda v: isinstance(v, dict) and all(map(is_number, v.values())),
    "quantization": lambda v: isinstance(v, dict) and is_number(v.get("int8_atol"))
    and v.get("int8_atol") > 0,
    "onnx_sizes": lambda v: isinstance(v, dict) and all(
        isinstance(e, dict) and all(is_int_in(e.get(k), 0, 2**62) for k in ("params", "macs"))
        for e in v.values()),
    "source_run": lambda v: isinstance(v, dict)
    and all(isinstance(x, str) for x in v.values()),
}


def verify_files(deploy_dir: str | Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check that every file the manifest lists (or just `names`) has its recorded sha256.

    Raises:
        ManifestError: a file missing, of another size, or with another sha256 (changed or
            damaged after export), naming the file.
    """
    deploy_dir = Path(deploy_dir)
    files = manifest.get("files", {})
    for name in files if names is None else names:
        if name not in files:
            raise ManifestError(f"{name!r} is not listed in {str(deploy_dir / MANIFEST_NAME)!r}")
        path, expected = artifact_file(deploy_dir, name, ManifestError), files[name]
        if not path.is_file():
            raise ManifestError(f"{str(path)!r} is listed in the manifest but missing")
        if path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            raise ManifestError(
                f"{str(path)!r} does not match its sha256 in the manifest: it was changed or "
                "damaged after export; re-export the run"
            )


def check_replaceable(folder: Path) -> None:
    """`--force` deletes only a deploy dir this toolkit wrote: a real folder whose manifest
    loads (this format) and that holds nothing but manifest.json, the files it lists and the
    reports folder.

    Raises:
        ManifestError: `folder` is a link, not a folder, has no valid manifest, or holds
            something the manifest does not account for; nothing was deleted.
    """
    refuse = f"--force replaces only a deploy dir dnr-export wrote; {str(folder)!r} "
    if folder.is_symlink() or not folder.is_dir():
        raise ManifestError(refuse + "is a symbolic link or not a folder; nothing was deleted")
    if not (folder / MANIFEST_NAME).is_file():
        raise ManifestError(refuse + f"has no {MANIFEST_NAME}; nothing was deleted")
    try:
        manifest = load_manifest(folder)
    except ManifestError as err:
        raise ManifestError(refuse + f"is not one ({err}); nothing was deleted") from None
    known = {MANIFEST_NAME, *manifest["files"], *UNLISTED_ENTRIES}
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in known)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ManifestError(refuse + f"also holds {shown}; nothing was deleted")


def format_classes(names: object, limit: int = 12) -> str:
    """"10 classes: zero, one, ..." for a run.json's or manifest's class_names ('' if none)."""
    if not isinstance(names, list) or not names:
        return ""
    shown = ", ".join(str(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} classes: {shown}"


def format_summary(deploy_dir: Path, manifest: dict) -> str:
    """One screen: what was deployed, how much smaller, file sizes, parity, the run's accuracy."""
    params, macs, parity = manifest["params"], manifest["macs"], manifest["parity"]
    lines = [
        f"deploy dir: {deploy_dir}",
        f"  {manifest['granularity']} run {manifest['source_run']['dir']}",
        *([f"  {format_classes(manifest.get('class_names'))}"]
          if manifest.get("class_names") else []),
        f"  params {params['dense']:,} -> {params['deployed']:,} "
        f"({params['dense'] / max(params['deployed'], 1):.1f}x compression)",
    ]
    lines.append(f"  conv/linear MACs {macs['dense']:,} -> {macs['executed']:,} executed "
                 f"({macs['reduction_executed']:.1f}x fewer), {macs['nonzero']:,} nonzero "
                 f"({macs['reduction_nonzero']:.1f}x fewer: what a sparse kernel needs)")
    for name, entry in manifest["files"].items():
        lines.append(f"  {name:<22} {entry['bytes'] / 1024:>10.1f} KiB")
    checks = []
    if "onnx_vs_torch_max_abs" in parity:
        checks.append(f"ONNX Runtime vs PyTorch max |diff| {parity['onnx_vs_torch_max_abs']:.2e}, "
                      f"argmax {parity['argmax_agree']}/{parity['n_images']}")
    if "shrunk_vs_masked_max_abs" in parity:
        checks.append(f"shrunk vs masked {parity['shrunk_vs_masked_max_abs']:.2e}")
    if "baseline_vs_torch_max_abs" in parity:
        checks.append(f"baseline.onnx vs PyTorch {parity['baseline_vs_torch_max_abs']:.2e}")
    if parity.get("csr_round_trip_exact"):
        checks.append("CSR round trip exact")
    int8 = manifest.get("quantization")
    if isinstance(int8, dict):
        checks.append(f"int8 vs reference int8 math {int8.get('int8_vs_reference_max_abs', 0):.3g}"
                      f", clean {100 * int8.get('clean_float', 0):.2f}% float -> "
                      f"{100 * int8.get('clean_int8', 0):.2f}% int8")
    where = f" on {parity['n_images']} test images" if "n_images" in parity else ""
    lines.append(f"  checks{where}: " + "; ".join(checks))
    acc, threat = manifest.get("accuracy") or {}, manifest.get("threat_model") or {}
    if acc:
        figures = ", ".join(f"{key} {100 * value:.2f}%" for key, value in acc.items())
        lines.append(f"  run accuracy ({threat.get('norm')} eps {threat.get('eps', 0):.4g}): "
                     f"{figures}")
    lines.append(f"  exported in {manifest['export_seconds']:.1f} s")
    return "\n".join(lines)
