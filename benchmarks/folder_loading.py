"""Does loading an image folder cost an epoch anything? The default small net on the 2,000-PNG
folder of the end-to-end test (the digits upsampled to 32x32 RGB, cached as uint8) against the
embedded digits upsampled in memory to the same 3x32x32 (float32), the same number of images,
epochs interleaved; and the DataLoader pass alone.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/folder_loading.py --beta 1 --reps 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from dnr_deploy.compress.config import CompressConfig
from dnr_deploy.compress.training import HybridObjective, build_model, train_one_epoch
from dnr_deploy.data import load_data
from dnr_deploy.data.folder import FolderOptions
from dnr_deploy.sparsity.policy import DensePolicy
from tests.test_folder_pipeline import digits_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.5, help="1: clean loss; 0.5: PGD-7")
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = digits_folder(Path(tempfile.mkdtemp()) / "digits", val=0)
    started = time.perf_counter()
    bundle = load_data("folder", str(folder), FolderOptions())
    print(f"folder read, checked, decoded and cached: {time.perf_counter() - started:.2f} s")
    digits = load_data("digits")
    x = torch.stack([digits.train[i][0] for i in range(len(digits.train))])
    y = torch.stack([digits.train[i][1] for i in range(len(digits.train))])
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    memory = TensorDataset(x.clamp(0, 1).contiguous(), y)
    sets = {"folder": Subset(bundle.train, range(len(memory))), "digits in memory": memory}
    config = CompressConfig(dataset="folder", data_dir=str(folder), beta=args.beta).resolved()
    times: dict[str, list[float]] = {name: [] for name in sets}
    for rep in range(args.reps):
        for name, dataset in sets.items():
            torch.manual_seed(0)
            model = build_model(config, bundle.spec)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                        weight_decay=5e-4)
            loader = DataLoader(dataset, 64, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
            started = time.perf_counter()
            train_one_epoch(model, loader, optimizer, HybridObjective(config), DensePolicy(),
                            torch.device("cpu"))
            times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in loader:
                pass
            print(f"beta {args.beta} rep {rep} {name}: epoch {times[name][-1]:.2f} s, loading "
                  f"alone {time.perf_counter() - started:.3f} s ({len(dataset)} images)",
                  flush=True)
    for name, values in times.items():
        print(f"{name}: median epoch {sorted(values)[len(values) // 2]:.2f} s of {len(values)}")


if __name__ == "__main__":
    main()
