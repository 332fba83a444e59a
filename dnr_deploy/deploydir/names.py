"""Every name of the deploy-dir contract, in one place: its files, the ONNX graph's input and
output, where dnr-export writes by default and where reports go. Export writes these names,
bench and verify read them; nothing else spells them."""

MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"  # self-contained, dynamic batch
FP32_MODEL_FILE = "model.fp32.onnx"  # --quantize int8: the float graph, the int8 one's reference
BASELINE_FILE = "baseline.onnx"  # optional: the unpruned architecture, for benchmarks
CSR_FILE = "weights.csr.npz"  # irregular runs: scipy CSR per prunable layer
WEIGHTS_FILE = "weights.npz"  # channel and dense runs: state dict of the shrunk network
HISTORY_FILE = "pruning_history.json"  # channel runs: torch-pruning's history, replayed at load
REPORTS_DIR = "reports"  # bench.json, verify.json, plots: outputs, never listed as artifacts
SIGNATURE_FILE = "model.sig"  # model-signing bundle over every file but itself and REPORTS_DIR
CLAIM_FILE = "verify.json"  # dnr-verify --sign: the gate's verdict, signed with the artifacts
# Entries of a deploy dir besides manifest.json and the files it lists: what `--force` may
# delete with it (anything else means the folder is not only this toolkit's)
UNLISTED_ENTRIES = (REPORTS_DIR, SIGNATURE_FILE, CLAIM_FILE)
DEFAULT_OUT = "deploy"  # dnr-export writes RUN_DIR/deploy unless told otherwise

INPUT_NAME = "input"  # float32 NCHW images in [0, 1]
OUTPUT_NAME = "logits"  # float32 (batch, classes), no softmax
