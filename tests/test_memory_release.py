"""compress() leaves nothing of its run alive: an export in the same process gets the memory."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: the cycle forms on a process's first optimizer and first plot, which an
# earlier test in this process may have made already. Collection is off, so nothing is freed
# behind compress's back.
SCRIPT = textwrap.dedent("""
    import gc, sys
    from torch import nn
    from dnr_deploy import CompressConfig, compress
    gc.disable()
    compress(CompressConfig(granularity="channel", density=0.1, epochs=1, eval_samples=32,
                            robust_eval_samples=2, out=sys.argv[1]))
    print(sum(isinstance(o, nn.BatchNorm2d) for o in gc.get_objects()))
""")


def test_no_network_of_the_run_outlives_compress(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0"  # 8 before compress collected its cycle
