"""A deploy dir's ONNX graphs against its manifest, when it is opened.

The sha256 table proves that the files are the ones the manifest lists, not that the manifest
describes them: whoever can rewrite a deploy dir can swap model.onnx and update its hash, and
bench would then print the manifest's figures of another network. So every ONNX file the
manifest lists is walked in full (`graph_check`: external data, unknown operators, oversized
sparse tensors), and its recomputed sizes (`graph_sizes`) must equal the manifest's:

- parameters and MACs equal the manifest's "onnx_sizes" record of that file, written by
  dnr-export with the same counter on the same file. The PyTorch-side figures ("params",
  "macs") are not compared: BatchNorm folding changes the parameter count, and a weight used
  outside a Linear module (nn.MultiheadAttention's in_proj) is a MatMul in ONNX that PyTorch's
  hook count never sees. On this project's nets the MAC counts are equal; dnr-bench uses the
  graph's own count anyway (`DeployDir.graphs`), never the manifest's;
- the graph's input takes the manifest's input_shape.
"""

from __future__ import annotations

from pathlib import Path

from dnr_deploy.deploydir.graph_check import GraphCheckError, check_graph, load_graph
from dnr_deploy.deploydir.graph_sizes import GraphSizes, graph_sizes
from dnr_deploy.deploydir.names import BASELINE_FILE, FP32_MODEL_FILE, MODEL_FILE

ONNX_FILES = (MODEL_FILE, FP32_MODEL_FILE, BASELINE_FILE)
SIZES_KEY = "onnx_sizes"


def measure_onnx_files(folder: Path, names: list[str], dense_params: int | None = None
                       ) -> dict[str, GraphSizes]:
    """Check and size each of `names` (those that are ONNX files of the contract).

    Raises:
        GraphCheckError: a graph that fails `graph_check.check_graph` or cannot be sized.
    """
    sizes = {}
    for name in names:
        if name not in ONNX_FILES:
            continue
        path = Path(folder) / name
        model = load_graph(path)
        check_graph(model, path, dense_params)
        sizes[name] = graph_sizes(model, repr(str(path)))
    return sizes


def check_deploy_graphs(folder: Path, manifest: dict) -> dict[str, GraphSizes]:
    """Every listed ONNX file checked and compared with the manifest (module docstring).

    Returns:
        {file name: its GraphSizes}, for sizing batches later.

    Raises:
        GraphCheckError: a hostile graph, or sizes that disagree with the manifest.
    """
    params = manifest.get("params") or {}
    dense = params.get("dense") if isinstance(params.get("dense"), int) else None
    sizes = measure_onnx_files(folder, list(manifest["files"]), dense)
    recorded = manifest.get(SIZES_KEY)
    for name, found in sizes.items():
        where = f"{str(Path(folder) / name)!r}"
        if found.input_shape != [int(n) for n in manifest["input_shape"]]:
            raise GraphCheckError(f"{where} takes {found.input_shape} images, the manifest says "
                                  f"{manifest['input_shape']}; the manifest does not describe "
                                  "this model (swapped?)")
        if not isinstance(recorded, dict) or not isinstance(recorded.get(name), dict):
            raise GraphCheckError(f"the manifest records no {SIZES_KEY} for {name}, so its "
                                  "parameters cannot be checked; re-export the run with this "
                                  "version of dnr-export")
        if recorded[name] != found.record():
            raise GraphCheckError(
                f"{where} stores {found.params:,} parameters and {found.macs:,} MACs, the "
                f"manifest records {recorded[name]}: the manifest does not describe this model "
                "(swapped and re-hashed?); re-export the run")
    return sizes
