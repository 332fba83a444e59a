"""--dataset folder: a folder of the user's images, its checks (one line, exit 2, naming the file
or folder), its split and record, and eps given as a fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnr_deploy.cli import build_compress_parser, compress_config_from, compress_main
from dnr_deploy.data import load_data, load_trained_data
from dnr_deploy.data.folder import CachedImages, FolderOptions, parse_image_size


def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6,
                 size: tuple[int, int] = (8, 8), mode: str = "RGB", split: str = "train") -> Path:
    """Images whose pixels encode their class, so a split can be checked by content."""
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            value = 40 * label + i
            pixels = np.full((*size, 3) if mode == "RGB" else size, value, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"{i}.png")
    return root


def compress_error(argv: list[str], capsys) -> str:
    """Run dnr-compress in this process; assert exit 2 and one line; return that line."""
    code = compress_main([*argv, "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dnr-compress: error:"), err
    return lines[0]


def test_folder_loads_with_a_stratified_split_and_a_record(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", per_class=10)
    bundle = load_data("folder", str(root), FolderOptions())
    assert bundle.spec.class_names == ("cat", "dog", "emu")
    assert bundle.spec.input_shape == (3, 8, 8) and bundle.spec.num_classes == 3
    assert isinstance(bundle.train, CachedImages) and len(bundle.train) + len(bundle.test) == 30
    test_labels = [int(bundle.test[i][1]) for i in range(len(bundle.test))]
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]  # stratified: a fifth of each class
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert abs(float(x[0, 0, 0]) * 255 - 40 * int(y)) < 10  # the label is the image's class
    pixels = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    assert bundle.spec.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-3)
    record = bundle.record
    assert record["class_names"] == ["cat", "dog", "emu"] and record["data_dir"] == str(root)
    # the same split again, read as export and verify read it (test split only)
    again = load_trained_data("folder", str(root), record, [3, 8, 8], record["mean"],
                              record["std"])
    assert again.train is None
    assert torch.equal(again.test.images, bundle.test.images)


def test_val_folder_channels_and_size_flags(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", mode="L", size=(10, 12))
    write_folder(root, mode="L", size=(10, 12), split="val", per_class=2)
    grey = load_data("folder", str(root), FolderOptions())
    assert grey.spec.input_shape == (1, 10, 12) and len(grey.test) == 6
    assert grey.record["test_from"] == "val/"
    rgb = load_data("folder", str(root), FolderOptions(image_size=(16, 16), channels=3,
                                                       mean=(0.5,) * 3, std=(0.25,) * 3))
    assert rgb.spec.input_shape == (3, 16, 16) and rgb.spec.mean == (0.5, 0.5, 0.5)
    assert parse_image_size("32") == (32, 32) and parse_image_size("24x48") == (24, 48)


def _empty_class(root: Path) -> str:
    (root / "train" / "fox").mkdir()
    return "fox"


def _single_class(root: Path) -> str:
    for name in ("dog", "emu"):
        for file in (root / "train" / name).iterdir():
            file.unlink()
        (root / "train" / name).rmdir()
    return "single class"


def _text_file(root: Path) -> str:
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return "notes.txt"


def _truncated(root: Path) -> str:
    file = root / "train" / "dog" / "3.png"
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(noise).save(file)  # incompressible: half the file is half the pixels
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    return "3.png"


def _not_an_image(root: Path) -> str:
    (root / "train" / "emu" / "fake.png").write_bytes(b"hello, not a png at all")
    return "fake.png"


def _mixed_sizes(root: Path) -> str:
    Image.new("RGB", (9, 7)).save(root / "train" / "cat" / "odd.png")
    return "--image-size"


def _different_classes(root: Path) -> str:
    write_folder(root, classes=("cat", "dog", "gnu"), split="val", per_class=2)
    return "gnu"


def _symlink_out(root: Path) -> str:
    outside = root.parent / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "train" / "cat" / "link.png").symlink_to(outside)
    return "link.png"


BAD_DATA = [_empty_class, _single_class, _text_file, _truncated, _not_an_image, _mixed_sizes,
            _different_classes, _symlink_out]


@pytest.mark.parametrize("damage", BAD_DATA, ids=lambda f: f.__name__.strip("_"))
def test_bad_data_is_one_line_and_exit_2(tmp_path: Path, capsys, damage) -> None:
    root = write_folder(tmp_path / "imgs")
    named = damage(root)
    line = compress_error(["--dataset", "folder", "--data-dir", str(root), "--out",
                           str(tmp_path / "run")], capsys)
    assert named in line, line
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("damage", [_text_file, _truncated, _not_an_image],
                         ids=lambda f: f.__name__.strip("_"))
def test_skip_bad_images_skips_and_counts(tmp_path: Path, capsys, damage) -> None:
    root = write_folder(tmp_path / "imgs")
    damage(root)
    bundle = load_data("folder", str(root), FolderOptions(skip_bad_images=True))
    assert len(bundle.train) + len(bundle.test) in (17, 18)  # the bad file, never a good one
    assert "skipped 1 " in capsys.readouterr().err


def test_images_smaller_than_the_model_say_the_size_it_needs(tmp_path: Path, capsys) -> None:
    root = write_folder(tmp_path / "imgs")
    line = compress_error(["--dataset", "folder", "--data-dir", str(root), "--model", "vgg16"],
                          capsys)
    assert "3x8x8" in line and "32x32" in line, line


def test_folder_flags_are_checked(tmp_path: Path, capsys) -> None:
    assert "--data-dir" in compress_error(["--dataset", "folder"], capsys)
    root = str(write_folder(tmp_path / "imgs"))
    assert "image_size" in compress_error(["--dataset", "folder", "--data-dir", root,
                                           "--image-size", "3x"], capsys)
    assert "channels" in compress_error(["--dataset", "folder", "--data-dir", root,
                                         "--channels", "2"], capsys)
    assert "std" in compress_error(["--dataset", "folder", "--data-dir", root,
                                    "--std", "0.5,0"], capsys)
    assert "folder" in compress_error(["--image-size", "16"], capsys)  # digits: a fixed size


def test_eps_as_a_fraction(capsys) -> None:
    config = compress_config_from(build_compress_parser().parse_args(["--eps", "8/255"]))
    assert config.eps == 8 / 255
    with pytest.raises(SystemExit) as exit_info:
        build_compress_parser().parse_args(["--eps", "1/0"])
    assert exit_info.value.code == 2
    assert "1/0" in capsys.readouterr().err


def test_eps_fraction_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eps: 4/255\npgd_step_size: 1/255\n")
    config = compress_config_from(build_compress_parser().parse_args(["--config", str(recipe)]))
    assert (config.eps, config.pgd_step_size) == (4 / 255, 1 / 255)


def test_a_folder_too_large_to_cache_is_decoded_on_read(tmp_path: Path, monkeypatch) -> None:
    from torch.utils.data import DataLoader

    from dnr_deploy.data import folder as image_folder

    root = write_folder(tmp_path / "imgs", per_class=10)
    cached = load_data("folder", str(root), FolderOptions())
    monkeypatch.setattr(image_folder, "CACHE_LIMIT_BYTES", 0)
    lazy = load_data("folder", str(root), FolderOptions())
    assert isinstance(lazy.train, image_folder.DecodedOnRead)
    assert lazy.spec == cached.spec  # the same classes, shape and measured mean/std
    batches = list(DataLoader(lazy.train, batch_size=8, num_workers=1))
    images = torch.cat([x for x, _ in batches])
    assert torch.equal(images, torch.stack([cached.train[i][0] for i in range(len(cached.train))]))
