"""Your own images: a folder tree (PATH/train/CLASS/*.png, PATH/val/ or PATH/test/ alike) read
through torchvision's ImageFolder into the float32 [0, 1] NCHW splits every stage takes.

A small dataset is decoded once and kept as uint8 tensors, so an epoch never waits on PNG
decoding; a larger one is decoded on read (DataLoader workers, `--workers`). Every check of the
data happens before training, as one DataError naming the file or folder (see `FolderError`'s
callers): empty or single classes, unreadable or non-image files, mixed sizes without a target
size, class sets that differ between splits, symlinks out of the folder.

What a run read is recorded (`record`) in run.json and the manifest, so export, verify and
runtime_tests read the same test split from the same folder, or from `--data-dir` once moved.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from dnr_deploy.data import SPECS, DataBundle, DataError, DatasetSpec
from dnr_deploy.vocabulary import DatasetName

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FOLDER_SPLIT_SEED = 0  # fixed, as the digits split: the test split never follows the run's seed
FOLDER_TEST_FRACTION = 0.2
CACHE_LIMIT_BYTES = 1 << 30  # decoded uint8 pixels kept in memory up to this size
STATS_IMAGES = 10_000  # mean/std of a folder too large to cache: measured on this many images
MAX_SIDE, MAX_CLASSES = 4096, 100_000  # bounds on what a record (an untrusted file) may claim


@dataclass(frozen=True)
class FolderOptions:
    """How a folder becomes tensors. `class_names` set: the classes a run was trained on,
    which the folder must hold (export and verify reading a recorded folder)."""

    image_size: tuple[int, int] | None = None  # (H, W); None: the images' own, all equal
    channels: int | None = None  # 1 or 3; None: 1 if every image is greyscale, else 3
    mean: tuple[float, ...] | None = None  # None: measured on the training images
    std: tuple[float, ...] | None = None
    skip_bad_images: bool = False
    class_names: tuple[str, ...] | None = None
    split_seed: int = FOLDER_SPLIT_SEED
    test_fraction: float = FOLDER_TEST_FRACTION
    test_only: bool = False  # scoring a trained model: train/ is listed, never decoded


def parse_image_size(text: str) -> tuple[int, int]:
    """"32" -> (32, 32); "32x48" -> (32, 48) (height x width).

    Raises:
        ValueError: anything else, or a side outside [1, MAX_SIDE].
    """
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or not all(1 <= s <= MAX_SIDE for s in sides):
        raise ValueError(f"image_size must be H or HxW with sides in [1, {MAX_SIDE}], "
                         f"got {text!r}")
    return sides[0], sides[1]


def parse_floats(text: str, name: str, positive: bool = False) -> tuple[float, ...]:
    """"0.5,0.4,0.3" -> (0.5, 0.4, 0.3), each finite (and > 0 when `positive`).

    Raises:
        ValueError: not a comma-separated list of such numbers.
    """
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(f"{name} must be comma-separated finite {kind}, one per channel "
                         f"(e.g. 0.5,0.5,0.5), got {text!r}")
    return values


def options_from_config(config) -> FolderOptions:
    """The FolderOptions a CompressConfig's flags ask for (validated by `resolved`)."""
    return FolderOptions(
        image_size=parse_image_size(config.image_size) if config.image_size else None,
        channels=config.channels,
        mean=parse_floats(config.mean, "mean") if config.mean else None,
        std=parse_floats(config.std, "std", positive=True) if config.std else None,
        skip_bad_images=config.skip_bad_images)


def options_from_record(record: dict | None, input_shape: list, mean: list | None = None,
                        std: list | None = None) -> FolderOptions:
    """The options that read a recorded folder's test split again: the model's image shape,
    the recorded classes and split. The record comes from a file: every field is checked.

    Raises:
        DataError: a field of the wrong type or out of bounds.
    """
    record = record or {}
    names = record.get("class_names")
    if names is not None and not (isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES
                                  and all(isinstance(n, str) and n for n in names)
                                  and len(set(names)) == len(names)):
        raise DataError("the recorded dataset's class_names are not a list of distinct names; "
                        "re-export the run")
    seed, fraction = record.get("split_seed", FOLDER_SPLIT_SEED), record.get(
        "test_fraction", FOLDER_TEST_FRACTION)
    if not (isinstance(seed, int) and 0 <= seed < 2**32 and isinstance(fraction, float | int)
            and 0 < fraction < 1):
        raise DataError("the recorded dataset's split_seed or test_fraction is out of range")
    try:
        channels, height, width = (int(n) for n in input_shape)
    except (TypeError, ValueError):
        raise DataError(f"input shape {input_shape!r} is not channels x height x width") from None
    if channels not in (1, 3) or not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise DataError(f"a folder dataset's images are 1 or 3 channels of at most {MAX_SIDE} "
                        f"pixels a side, the model takes {list(input_shape)}")
    return FolderOptions((height, width), channels,
                         tuple(mean) if mean else (0.0,) * channels,
                         tuple(std) if std else (1.0,) * channels,
                         bool(record.get("skip_bad_images", False)),
                         tuple(names) if names else None, seed, float(fraction), test_only=True)


def recorded_folder_spec(entry: dict | None) -> DatasetSpec:
    """The shapes and classes a run's "dataset" record states, for checking run.json.

    Raises:
        DataError: no record, or a damaged one.
    """
    if not isinstance(entry, dict) or entry.get("name") != DatasetName.FOLDER.value:
        raise DataError("a folder run's run.json lacks its dataset record; the run is damaged")
    size = entry.get("image_size")
    shape = [entry.get("channels"), *size] if isinstance(size, list) and len(size) == 2 else []
    options = options_from_record(entry, shape)
    if options.class_names is None:
        raise DataError("the dataset record lacks its class_names; the run is damaged")
    return replace(SPECS[DatasetName.CIFAR10], num_classes=len(options.class_names),
                   input_shape=(options.channels, *options.image_size),
                   class_names=options.class_names)


def record(data_dir: str, spec: DatasetSpec, options: FolderOptions, test_from: str) -> dict:
    """The "dataset" entry of run.json and the manifest: what reads this split again."""
    return {"name": DatasetName.FOLDER.value, "split": "test", "data_dir": data_dir,
            "image_size": list(spec.input_shape[1:]), "channels": spec.input_shape[0],
            "mean": list(spec.mean), "std": list(spec.std), "class_names": list(spec.class_names),
            "test_from": test_from, "split_seed": options.split_seed,
            "test_fraction": options.test_fraction, "skip_bad_images": options.skip_bad_images}


class CachedImages(Dataset):
    """Decoded images as one uint8 tensor: a read is an index and a divide."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]


class DecodedOnRead(Dataset):
    """A folder too large to cache: each image is decoded when it is read."""

    def __init__(self, samples: list[tuple[str, int]], size: tuple[int, int],
                 channels: int) -> None:
        self.samples, self.size, self.channels = samples, size, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        pixels = _decode(path, self.size, self.channels)
        return torch.from_numpy(pixels).float().div_(255.0), torch.tensor(label)


def load_folder(data_dir: str, options: FolderOptions) -> DataBundle:
    """Train and test splits of the image folder `data_dir`, with its record.

    Raises:
        DataError: a missing folder, or bad data (one line naming the file or folder).
    """
    root = Path(data_dir)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{str(root)!r} must hold train/CLASS/*.png (and val/ or test/ in the "
                        "same shape; without one, a seeded fifth of train/ is the test split)")
    _check_links(root)
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    train_samples, classes, skipped = _samples(train_dir, options.skip_bad_images)
    if options.class_names is not None and tuple(classes) != options.class_names:
        raise DataError(f"{str(train_dir)!r} holds the classes {_names(classes)}, the model was "
                        f"trained on {_names(options.class_names)}: name the trained folder")
    if test_dir is None:
        train_samples, test_samples = _stratified_split(train_samples, classes, options,
                                                        train_dir)
        test_from = f"a seeded {options.test_fraction:g} of {train_dir.name}/"
    else:
        test_samples, test_classes, more = _samples(test_dir, options.skip_bad_images)
        skipped += more
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise DataError(f"{str(train_dir)!r} and {str(test_dir)!r} hold different classes "
                            f"(only in train/: {_names(only_train)}; only in {test_dir.name}/: "
                            f"{_names(only_test)})")
        test_from = f"{test_dir.name}/"
    if options.test_only:
        train_samples = []  # test_subset reads the test split alone
    headers = _headers(train_samples + test_samples, options)
    good = {path for path, _ in headers}
    skipped += len(train_samples) + len(test_samples) - len(good)
    train_samples = [s for s in train_samples if s[0] in good]
    test_samples = [s for s in test_samples if s[0] in good]
    size, channels = _target(headers, options)
    cache = (len(good) * channels * size[0] * size[1]) <= CACHE_LIMIT_BYTES
    train, failed_train = _dataset(train_samples, size, channels, cache, options.skip_bad_images) \
        if train_samples else (None, 0)
    test, failed_test = _dataset(test_samples, size, channels, cache, options.skip_bad_images)
    skipped += failed_train + failed_test
    mean, std = options.mean, options.std
    if mean is None or std is None:
        measured = _mean_std(train, channels)
        mean, std = mean or measured[0], std or measured[1]
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"--mean and --std need {channels} value(s), one per channel of the "
                        f"images, got {len(mean)} and {len(std)}")
    cifar = SPECS[DatasetName.CIFAR10]  # own images take CIFAR's threat model (8/255)
    spec = replace(cifar, num_classes=len(classes), input_shape=(channels, *size),
                   mean=tuple(mean), std=tuple(std), class_names=tuple(classes))
    if skipped:
        import sys

        print(f"--skip-bad-images: skipped {skipped} unreadable or non-image file(s) under "
              f"{str(root)!r}", file=sys.stderr)
    return DataBundle(train, test, spec, record=record(data_dir, spec, options, test_from))


def _names(names) -> str:
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return shown or "none"


def _check_links(root: Path) -> None:
    """Reads stay inside the folder: a symlink (file or folder) leading out of it is refused."""
    inside = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise DataError(f"{str(path)!r} is a symlink to {str(path.resolve())!r}, outside "
                                f"{str(root)!r}: copy what it points to into the folder")


def _samples(split_dir: Path, skip_bad: bool) -> tuple[list[tuple[str, int]], list[str], int]:
    """(path, label) of every image under split_dir/CLASS/, the class names, and how many
    non-image files `skip_bad` passed over. Hidden files (.DS_Store) are ignored."""
    from torchvision.datasets import ImageFolder

    strays = [path for path in sorted(split_dir.rglob("*")) if path.is_file()
              and not path.name.startswith(".") and path.suffix.lower() not in IMAGE_EXTENSIONS]
    if strays and not skip_bad:
        raise DataError(f"{str(strays[0])!r} is not an image ({', '.join(IMAGE_EXTENSIONS)}); "
                        "remove it or pass --skip-bad-images")
    loose = [p for p in split_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose and not skip_bad:
        raise DataError(f"{str(loose[0])!r} lies outside a class folder: images go in "
                        f"{str(split_dir)}/CLASS/")
    try:
        folder = ImageFolder(str(split_dir), is_valid_file=_is_image, allow_empty=True)
    except FileNotFoundError:  # torchvision: "Couldn't find any class folder"
        raise DataError(f"{str(split_dir)!r} holds no class folders: put each class's images "
                        "in a folder named after the class") from None
    counts = Counter(label for _, label in folder.samples)
    empty = [name for index, name in enumerate(folder.classes) if not counts[index]]
    if empty:
        raise DataError(f"class folder {str(split_dir / empty[0])!r} holds no images")
    if len(folder.classes) < 2:
        raise DataError(f"{str(split_dir)!r} holds a single class ({folder.classes[0]!r}); "
                        "a classifier needs at least two class folders")
    return list(folder.samples), list(folder.classes), len(strays) + len(loose)


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _stratified_split(samples: list, classes: list[str], options: FolderOptions,
                      train_dir: Path) -> tuple[list, list]:
    from sklearn.model_selection import train_test_split

    labels = [label for _, label in samples]
    smallest = min(Counter(labels).items(), key=lambda item: item[1])
    if smallest[1] < 2:
        raise DataError(f"class folder {str(train_dir / classes[smallest[0]])!r} holds one "
                        "image; splitting off a test set needs two per class (or add val/)")
    try:
        train, test = train_test_split(samples, test_size=options.test_fraction,
                                       random_state=options.split_seed, stratify=labels)
    except ValueError as err:
        raise DataError(f"{str(train_dir)!r} is too small to split off a test set ({err}); "
                        "add val/ or more images") from None
    return list(train), list(test)


def _headers(samples: list, options: FolderOptions) -> list[tuple[str, tuple[int, int, str]]]:
    """(path, (height, width, mode)) read from each file's header, without decoding."""
    from PIL import Image, UnidentifiedImageError

    found = []
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                found.append((path, (image.height, image.width, image.mode)))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            if not options.skip_bad_images:
                raise DataError(f"{path!r} is not a readable image ({type(err).__name__}); "
                                "replace it or pass --skip-bad-images") from None
    return found


def _target(headers: list, options: FolderOptions) -> tuple[tuple[int, int], int]:
    """The size every image is brought to, and the channel count."""
    grey = {"1", "L", "LA", "I", "I;16", "F"}
    channels = options.channels or (1 if all(h[2] in grey for _, h in headers) else 3)
    if options.image_size is not None:
        return options.image_size, channels
    first_path, (height, width, _) = headers[0]
    for path, (h, w, _) in headers:
        if (h, w) != (height, width):
            raise DataError(f"images differ in size ({first_path!r} is {height}x{width}, "
                            f"{path!r} is {h}x{w}); pass --image-size H or HxW to resize them")
    return (height, width), channels


def _decode(path: str, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 C x H x W at `size` (bilinear resize when it differs)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # a truncated file fails here, not later
        image = image.convert("L" if channels == 1 else "RGB")
        if (image.height, image.width) != size:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


def _dataset(samples: list, size: tuple[int, int], channels: int, cache: bool,
             skip_bad: bool) -> tuple[Dataset, int]:
    """The split's dataset, and how many files `skip_bad` passed over while decoding."""
    if not cache:
        return DecodedOnRead(samples, size, channels), 0
    images, labels = [], []
    for path, label in samples:
        try:
            images.append(_decode(path, size, channels))
            labels.append(label)
        except (OSError, ValueError) as err:
            if not skip_bad:
                reason = " ".join(str(err).split())[:80] or type(err).__name__
                raise DataError(f"{path!r} cannot be decoded ({reason}); replace it or pass "
                                "--skip-bad-images") from None
    if not images:
        raise DataError("no image of this split could be decoded")
    dataset = CachedImages(torch.from_numpy(np.stack(images)), torch.tensor(labels))
    return dataset, len(samples) - len(images)


def _mean_std(train: Dataset, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training pixels in [0, 1] (of the first STATS_IMAGES
    evenly spaced images when the folder is not cached)."""
    if isinstance(train, CachedImages):
        pixels = train.images.transpose(0, 1).reshape(channels, -1).double() / 255.0
    else:
        step = max(1, len(train) // STATS_IMAGES)
        picked = Subset(train, range(0, len(train), step))
        pixels = torch.stack([picked[i][0] for i in range(len(picked))]).transpose(0, 1)
        pixels = pixels.reshape(channels, -1).double()
    mean, std = pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
