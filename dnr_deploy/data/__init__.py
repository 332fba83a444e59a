"""Datasets: the embedded digits default; CIFAR-10/100, Tiny-ImageNet and your own image folder
(image_folder.py) from a local folder.

Every loader yields float32 NCHW images in [0, 1]; normalization is the model's first module.
Nothing here downloads: a missing folder is an error that says what to put there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from dnr_deploy.vocabulary import DatasetName


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and an attack need to know about a dataset, and its usual threat model."""

    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float  # Linf radius in [0, 1] pixel units
    pgd_step_size: float  # training PGD step
    eval_pgd7_step_size: float  # the paper's PGD-7 evaluation step (0.01 at eps 8/255)
    # test images the AutoAttack-grade ensemble scores (None: all). 1,000 is RobustBench's quick
    # subset: the full ensemble on 10,000 CIFAR images costs hours on a GPU, days on a CPU.
    robust_eval_images: int | None = 1000
    class_names: tuple[str, ...] = ()  # recorded in run.json and the manifest; () if unnamed


SPECS: dict[DatasetName, DatasetSpec] = {
    # eps 0.2 on 8x8 digits: robustness neither trivial (eps 0.1 gives ~91% PGD-20) nor hopeless
    # (eps 0.3 gives ~44%), measured on this machine (DESIGN.md section 4). The PGD-7 evaluation
    # step keeps the paper's ratio step/eps = 0.01 / (8/255).
    DatasetName.DIGITS: DatasetSpec(
        10, (1, 8, 8), (0.3053,), (0.3760,), 0.2, 0.05, round(0.2 * 0.01 / (8 / 255), 4),
        robust_eval_images=None,  # all 360: the full ensemble takes about a minute here
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    DatasetName.CIFAR10: DatasetSpec(
        10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 8 / 255, 2 / 255, 0.01,
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
    ),
    DatasetName.CIFAR100: DatasetSpec(
        100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 8 / 255, 2 / 255, 0.01
    ),
    DatasetName.TINYIMAGENET: DatasetSpec(
        200, (3, 64, 64), (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), 8 / 255, 2 / 255, 0.01
    ),
}

DIGITS_SPLIT_SEED = 0  # fixed: the test split is the same whatever the run's seed
DIGITS_TEST_FRACTION = 0.2


class DataError(ValueError):
    """The data a run asked for cannot be loaded (missing folder, wrong layout)."""


@dataclass
class DataBundle:
    train: Dataset | None  # None: a test split alone (`byo.api_test_split`)
    test: Dataset
    spec: DatasetSpec
    from_api: tuple[str, ...] = ()  # splits passed to dnr_deploy.compress() (see byo.py)
    record: dict | None = None  # an image folder's "dataset" entry (image_folder.record)


def parse_dataset(name: str) -> DatasetName:
    try:
        return DatasetName(name)
    except ValueError:
        allowed = ", ".join(d.value for d in DatasetName)
        raise ValueError(f"unknown dataset {name!r}; available: {allowed}") from None


def threat_spec(dataset: DatasetName) -> DatasetSpec:
    """The spec whose threat model a dataset takes: its own, or CIFAR's for an image folder
    (whose shapes and classes are known only once it is read)."""
    return SPECS.get(dataset, SPECS[DatasetName.CIFAR10])


def load_data(name: str, data_dir: str | None = None, folder=None) -> DataBundle:
    """Train and test splits of `name` (`folder`: the image_folder.FolderOptions of a folder).

    Raises:
        ValueError: unknown dataset.
        DataError: a folder-based dataset without a usable `data_dir`.
    """
    dataset = parse_dataset(name)
    if dataset is DatasetName.DIGITS:
        train, test = _digits()
    elif dataset is DatasetName.FOLDER:
        from dnr_deploy.data.folder import FolderOptions, load_folder

        return load_folder(str(_require_dir(dataset, data_dir)), folder or FolderOptions())
    elif dataset is DatasetName.TINYIMAGENET:
        train, test = _tinyimagenet(_require_dir(dataset, data_dir))
    else:
        train, test = _cifar(dataset, _require_dir(dataset, data_dir))
    return DataBundle(train, test, SPECS[dataset])


def load_trained_data(name: str, data_dir: str | None, record: dict | None,
                      input_shape: list, mean: list | None = None,
                      std: list | None = None, with_train: bool = False) -> DataBundle:
    """The test split a trained model is scored on (export, verify, runtime_tests): an image
    folder is read as its run recorded it (`record`: run.json's or the manifest's "dataset"),
    at the model's input shape, and must hold the classes it was trained on. `with_train`
    reads its train split too (int8 export calibrates on training images).

    Raises:
        ValueError: unknown dataset.
        DataError: as `load_data`, or a damaged record.
    """
    if parse_dataset(name) is not DatasetName.FOLDER:
        return load_data(name, data_dir)
    from dnr_deploy.data.folder import options_from_record

    options = options_from_record(record, input_shape, mean, std)
    if with_train:
        options = dataclasses.replace(options, test_only=False)
    return load_data(name, data_dir, options)


def test_subset(bundle: DataBundle, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` test images and labels (all if None) as two tensors."""
    count = len(bundle.test) if n is None else min(n, len(bundle.test))
    xs, ys = zip(*(bundle.test[i] for i in range(count)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def _digits() -> tuple[Dataset, Dataset]:
    # scikit-learn ships the 1,797 UCI digits inside the wheel: no download, ever.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # N,1,8,8 in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED, stratify=digits.target,
    )
    as_set = lambda x, y: TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())  # noqa: E731
    return as_set(x_tr, y_tr), as_set(x_te, y_te)


def _require_dir(dataset: DatasetName, data_dir: str | None) -> Path:
    what = {
        DatasetName.CIFAR10: "the extracted 'cifar-10-batches-py' folder",
        DatasetName.CIFAR100: "the extracted 'cifar-100-python' folder",
        DatasetName.TINYIMAGENET: "'tiny-imagenet-200' with train/ and val/",
        DatasetName.FOLDER: "train/CLASS/*.png (and val/ or test/ alike)",
    }[dataset]
    if not data_dir:
        raise DataError(f"--dataset {dataset.value} needs --data-dir: a folder holding {what}")
    path = Path(data_dir)
    if not path.is_dir() or not any(path.iterdir()):
        raise DataError(f"data folder {str(path)!r} is missing or empty; put {what} there")
    return path


def _cifar(dataset: DatasetName, root: Path) -> tuple[Dataset, Dataset]:
    from torchvision import datasets, transforms

    cls = datasets.CIFAR10 if dataset is DatasetName.CIFAR10 else datasets.CIFAR100
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
         transforms.ToTensor()]
    )
    try:
        train = cls(str(root), train=True, transform=augment, download=False)
        test = cls(str(root), train=False, transform=transforms.ToTensor(), download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{dataset.value} not found under {str(root)!r}: {err}") from None
    return train, test


def _tinyimagenet(root: Path) -> tuple[Dataset, Dataset]:
    from torchvision import datasets, transforms

    if root.name != "tiny-imagenet-200" and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DataError(f"{str(root)!r} must hold train/ and val/ (the tiny-imagenet-200 layout)")
    augment = transforms.Compose(
        [transforms.RandomCrop(64, padding=4), transforms.RandomHorizontalFlip(),
         transforms.ToTensor()]
    )
    train = datasets.ImageFolder(str(train_dir), transform=augment)
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():  # the official layout: val/images/*.JPEG plus a label file
        return train, _TinyImageNetVal(val_dir, annotations, train.class_to_idx)
    return train, datasets.ImageFolder(str(val_dir), transform=transforms.ToTensor())


class _TinyImageNetVal(Dataset):
    """The official val split is one flat folder plus a label file, not an ImageFolder tree."""

    def __init__(self, val_dir: Path, annotations: Path, class_to_idx: dict[str, int]) -> None:
        from torchvision import transforms

        self.to_tensor = transforms.ToTensor()
        self.items = []
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                self.items.append((val_dir / "images" / fields[0], class_to_idx[fields[1]]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as image:
            return self.to_tensor(image.convert("RGB")), label
