"""Image data: folders (captions from .txt / metadata.csv / metadata.jsonl, corrupt files skipped), builtin:shapes
(disjoint fixed splits, images that match their captions), saved and hub-style datasets, and bad input."""

import io
import itertools
import json

import datasets
import datasets.config
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import preprocess_image_vae_dataset
from data.builtin_shapes import PALETTE, POSITIONS, SHAPES, draw_shape, shape_spec, shape_specs
from data.image_sources import _dataset_record, load_image_item
from data.sharded_cache import ShardedCache

GREEN, RED = (0, 128, 0), (200, 0, 0)


def preprocess(*args) -> int:
    return preprocess_image_vae_dataset.main([str(arg) for arg in args])


def assert_one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def banded(width: int, height: int) -> Image.Image:
    """Red, with a green band across the middle of the long side that covers the centred square crop and more."""
    image = Image.new("RGB", (width, height), RED)
    long_side, short_side = max(width, height), min(width, height)
    start = (long_side - short_side) // 2 - 12  # wider than the resampling filter reaches
    box = (start, 0, start + short_side + 24, height) if width > height else (0, start, width, start + short_side + 24)
    image.paste(GREEN, box)
    return image


def solid(color: tuple, size: int) -> torch.Tensor:
    """A uint8 image (3, size, size) of one colour."""
    return torch.tensor(color, dtype=torch.uint8)[:, None, None].expand(3, size, size)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """8 image files (2 corrupt), captions in every supported place, and a .txt that is not a caption."""
    root = tmp_path / "images"
    for folder in ("a", "b", "c"):
        (root / folder).mkdir(parents=True)
    banded(120, 40).save(root / "a" / "wide.png")
    (root / "a" / "wide.txt").write_text("a wide picture\n")
    banded(30, 100).save(root / "a" / "tall.jpg", quality=98)
    Image.new("L", (20, 20), 77).save(root / "b" / "gray.png")
    Image.new("RGBA", (24, 24), (0, 0, 255, 0)).save(root / "b" / "clear.png")
    Image.new("RGB", (18, 18), (10, 20, 30)).save(root / "c" / "plain.bmp")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "c" / "uncaptioned.webp")
    (root / "c" / "broken.png").write_bytes(b"this is not a png")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpeg, format="JPEG")
    (root / "c" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "metadata.csv").write_text("file_name,text\na/tall.jpg,\"a tall one, from csv\"\na/wide.png,ignored\n")
    (root / "b" / "metadata.jsonl").write_text(json.dumps({"file_name": "gray.png", "caption": "gray, from jsonl"})
                                               + "\n\n" + json.dumps({"file_name": "clear.png", "text": "clear"}))
    (root / "c" / "notes.txt").write_text("not a caption: notes.png does not exist")
    (root / "c" / "plain.txt").write_text("plain, from txt")
    return root


def items_by_id(cache: ShardedCache) -> dict[str, dict]:
    return {item["source_id"]: item for item in cache}


def test_folder_splits_captions_and_corrupt_images(tmp_path, image_folder, capsys):
    caches = {}
    for split in ("train", "validation"):
        out = tmp_path / split
        assert preprocess("--input_dir", image_folder, "--split", split, "--image_size", 16, "--val_fraction", 0.3,
                          "--output_dir", out, "--items_per_shard", 3) == 0
        caches[split] = ShardedCache(out)
        skipped = caches[split].meta["skipped"]
        assert f"skipped  {len(skipped)}" in capsys.readouterr().out
    train, validation = items_by_id(caches["train"]), items_by_id(caches["validation"])
    assert train and validation and not set(train) & set(validation)
    assert set(train) | set(validation) == {"a/wide.png", "a/tall.jpg", "b/gray.png", "b/clear.png", "c/plain.bmp",
                                            "c/uncaptioned.webp"}
    items = {**train, **validation}
    captions = {key: item["caption"] for key, item in items.items()}
    assert captions == {"a/wide.png": "a wide picture", "a/tall.jpg": "a tall one, from csv",
                        "b/gray.png": "gray, from jsonl", "b/clear.png": "clear", "c/plain.bmp": "plain, from txt",
                        "c/uncaptioned.webp": ""}
    for item in items.values():
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    # centre crop of the long side, then resize: only the green band is left
    for key, tolerance in (("a/wide.png", 0), ("a/tall.jpg", 4)):
        pixels = items[key]["image"].permute(1, 2, 0).int()
        assert (pixels - torch.tensor(GREEN)).abs().max() <= tolerance, key
    assert torch.equal(items["b/gray.png"]["image"], torch.full((3, 16, 16), 77, dtype=torch.uint8))
    assert torch.equal(items["b/clear.png"]["image"], torch.full((3, 16, 16), 255, dtype=torch.uint8))  # on white
    skipped = [entry for cache in caches.values() for entry in cache.meta["skipped"]]
    assert sorted(entry["source_id"] for entry in skipped) == ["c/broken.png", "c/truncated.jpg"]
    assert all(entry["reason"].startswith(("UnidentifiedImageError", "OSError")) for entry in skipped)
    for cache in caches.values():
        meta = cache.meta
        assert meta["image_size"] == 16 and meta["counts"] == {"images": len(cache), "skipped": len(meta["skipped"])}
        assert meta["source"] == {"kind": "folder", "input_dir": str(image_folder), "split": cache.meta["split"],
                                  "caption_column": "text", "val_fraction": 0.3}
    # the same split again: the same images in the same order
    assert preprocess("--input_dir", image_folder, "--split", "train", "--image_size", 16, "--val_fraction", 0.3,
                      "--output_dir", tmp_path / "again") == 0
    assert list(items_by_id(ShardedCache(tmp_path / "again"))) == list(train)


def test_builtin_shapes_splits_are_disjoint_and_deterministic(tmp_path):
    args = ("--dataset_name", "builtin:shapes", "--image_size", 32)
    assert preprocess(*args, "--max_images", 60, "--output_dir", tmp_path / "train") == 0
    assert preprocess(*args, "--max_images", 60, "--output_dir", tmp_path / "again", "--num_workers", 2) == 0
    assert preprocess(*args, "--max_images", 20, "--split", "validation", "--output_dir", tmp_path / "val") == 0
    train, again, validation = (ShardedCache(tmp_path / name) for name in ("train", "again", "val"))
    assert len(train) == 60 and len(validation) == 20
    for first, second in zip(train, again):
        assert torch.equal(first["image"], second["image"]) and first["caption"] == second["caption"]
    train_images = {item["image"].numpy().tobytes() for item in train}
    assert len(train_images) == 60
    assert not train_images & {item["image"].numpy().tobytes() for item in validation}
    assert not {item["source_id"] for item in train} & {item["source_id"] for item in validation}
    assert train.meta["source"] == {"kind": "builtin", "dataset_name": "builtin:shapes", "split": "train",
                                    "max_images": 60}
    item = train[0]
    assert item["source_id"] == "builtin:shapes/0" and item["caption"] == shape_spec(0).caption
    assert {key: item[key] for key in ("shape", "color", "size", "position", "background")} == \
        shape_spec(0).attributes()


def test_builtin_split_streams_never_share_an_index():
    train = [index for index, _ in itertools.islice(shape_specs("train"), 400)]
    validation = [index for index, _ in itertools.islice(shape_specs("validation"), 20)]
    assert not set(train) & set(validation) and 10 <= validation[-1] < 1000
    with pytest.raises(ValueError, match="splits train, validation"):
        next(shape_specs("test"))


@pytest.mark.parametrize("index", range(12))
def test_shape_images_match_their_captions(index):
    """The pixels of the shape colour sit in the named grid cell, cover about the named size, and the rest is
    background; the caption names the same attributes."""
    spec = shape_spec(index)
    assert spec.shape in SHAPES and spec.position in POSITIONS and spec.color != spec.background
    for word in (spec.shape, spec.color, spec.size, spec.background):
        assert word in spec.caption
    size = 96
    pixels = np.asarray(draw_shape(spec, size), dtype=np.int32)
    shape_color, background = np.array(PALETTE[spec.color]), np.array(PALETTE[spec.background])
    is_shape = np.abs(pixels - shape_color).sum(-1) < np.abs(pixels - background).sum(-1)
    rows, columns = np.nonzero(is_shape)
    cell = POSITIONS.index(spec.position)
    assert int(columns.mean() * 3 // size) == cell % 3 and int(rows.mean() * 3 // size) == cell // 3
    assert max(np.ptp(rows), np.ptp(columns)) <= spec.diameter * size + 2  # inside its circumscribed circle
    assert max(np.ptp(rows), np.ptp(columns)) >= 0.4 * spec.diameter * size
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (np.abs(corners - background) <= 1).all()  # the shape never reaches the corners


def test_from_disk_and_local_dataset_path(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows = {"image": [{"bytes": png_bytes(Image.new("RGB", (20, 30), color)), "path": None} for color in colors]
            + [{"bytes": b"corrupt", "path": None}],
            "caption": ["red", "green", "blue", "broken"]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": dataset, "validation": dataset.select([1])}).save_to_disk(tmp_path / "saved")
    assert preprocess("--from_disk", tmp_path / "saved", "--split", "val", "--caption_column", "caption",
                      "--image_size", 16, "--output_dir", tmp_path / "disk_val") == 0
    assert [item["caption"] for item in ShardedCache(tmp_path / "disk_val")] == ["green"]

    (tmp_path / "parquet").mkdir()
    dataset.to_parquet(tmp_path / "parquet" / "train.parquet")  # read by load_dataset(path, streaming=True)
    for flag, where in (("--from_disk", tmp_path / "saved"), ("--dataset_name", tmp_path / "parquet")):
        out = tmp_path / f"out{flag}"
        assert preprocess(flag, where, "--caption_column", "caption", "--image_size", 16, "--output_dir", out) == 0
        cache = ShardedCache(out)
        assert [item["caption"] for item in cache] == ["red", "green", "blue"]
        assert cache.meta["counts"] == {"images": 3, "skipped": 1}
        assert cache.meta["skipped"][0]["source_id"] == "train/3"
        for item, color in zip(cache, colors):
            assert torch.equal(item["image"], solid(color, 16))
    Image.new("RGB", (8, 8), colors[2]).save(tmp_path / "blue.png")  # rows that only name a local file
    record = _dataset_record({"bytes": None, "path": str(tmp_path / "blue.png")}, "train/0", "blue", "a dataset")
    assert torch.equal(load_image_item(record, 16)[0]["image"], solid(colors[2], 16))
    assert preprocess("--from_disk", tmp_path / "saved", "--caption_column", "none", "--image_size", 16,
                      "--max_images", 2, "--output_dir", tmp_path / "uncaptioned") == 0
    assert [item["caption"] for item in ShardedCache(tmp_path / "uncaptioned")] == ["", ""]


def test_dataset_errors(tmp_path, capsys, monkeypatch):
    dataset = datasets.Dataset.from_dict({"picture": [png_bytes(Image.new("RGB", (8, 8)))], "label": [3]})
    dataset.save_to_disk(tmp_path / "saved")
    out = tmp_path / "out"
    assert preprocess("--from_disk", tmp_path / "saved", "--output_dir", out) == 1
    assert_one_line_error(capsys, "no column 'image'", "--image_column")
    assert preprocess("--from_disk", tmp_path / "saved", "--image_column", "picture", "--output_dir", out) == 1
    assert_one_line_error(capsys, "no column 'text'", "--caption_column none")
    assert preprocess("--from_disk", tmp_path / "saved", "--image_column", "label", "--caption_column", "none",
                      "--output_dir", out) == 1
    assert_one_line_error(capsys, "holds int, not an image")
    assert preprocess("--from_disk", tmp_path, "--output_dir", out) == 1
    assert_one_line_error(capsys, "is not a dataset written by save_to_disk")
    assert preprocess("--from_disk", tmp_path / "saved", "--image_column", "picture", "--caption_column", "none",
                      "--output_dir", out) == 0  # raw bytes columns work too

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert preprocess("--dataset_name", "no-such-user/no-such-images", "--output_dir", tmp_path / "hub") == 1
    assert_one_line_error(capsys, "no-such-user/no-such-images", "--input_dir", "--from_disk", "builtin:shapes")
    assert not (tmp_path / "hub").exists()


def test_cli_errors(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    cases = [
        (("--input_dir", tmp_path / "nowhere"), ["nowhere", "is not a directory"]),
        (("--input_dir", image_folder / "a", "--split", "test"), ["--split must be one of train, validation"]),
        (("--dataset_name", "builtin:faces"), ["unknown built-in dataset", "builtin:shapes"]),
        (("--dataset_name", "builtin:shapes", "--image_size", 8), ["--image_size must be at least 16"]),
        (("--dataset_name", "builtin:shapes", "--max_images", 0), ["--max_images must be positive"]),
        (("--input_dir", image_folder, "--val_fraction", 1.5), ["--val_fraction"]),
        (("--dataset_name", "builtin:shapes", "--num_workers", -1), ["--num_workers must be >= 0"]),
    ]
    for args, fragments in cases:
        assert preprocess(*args, "--output_dir", out) == 1, args
        assert_one_line_error(capsys, *fragments)
    (tmp_path / "empty").mkdir()
    assert preprocess("--input_dir", tmp_path / "empty", "--output_dir", out) == 1
    assert_one_line_error(capsys, "holds no images")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    (broken / "y.png").write_bytes(b"garbage")
    assert preprocess("--input_dir", broken, "--output_dir", out) == 1
    assert_one_line_error(capsys, "no image could be read", "1 skipped", "UnidentifiedImageError")
    (image_folder / "metadata.csv").write_text("name,text\nx.png,y\n")
    assert preprocess("--input_dir", image_folder, "--output_dir", out) == 1
    assert_one_line_error(capsys, "metadata.csv:2: no 'file_name' field")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    assert preprocess("--dataset_name", "builtin:shapes", "--input_dir", image_folder) == 2  # argparse: one source
    assert preprocess("--dataset_name", "builtin:shapes", "--max_images", 2, "--image_size", 16,
                      "--output_dir", out) == 0
    assert preprocess("--dataset_name", "builtin:shapes", "--max_images", 2, "--output_dir", out) == 1
    assert_one_line_error(capsys, "already exists", "--overwrite")
    assert preprocess("--dataset_name", "builtin:shapes", "--max_images", 3, "--image_size", 16, "--output_dir", out,
                      "--overwrite") == 0
    assert len(ShardedCache(out)) == 3
