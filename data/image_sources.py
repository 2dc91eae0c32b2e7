"""Where captioned images come from: a Hugging Face dataset, a saved dataset, a folder, or `builtin:shapes`.

    source = ImageSource(input_dir="photos", split="train")
    for record in source.records():                    # ImageRecord: source_id, caption, and where the pixels are
        item, skipped = load_image_item(record, image_size=256)   # runs in worker processes

A folder (`input_dir`, searched recursively for IMAGE_SUFFIXES) takes each image's caption from a `.txt` file of
the same name beside it, else from a `metadata.csv` or `metadata.jsonl` in its folder or above (columns `file_name`,
relative to the metadata file, and `caption_column`, `text` or `caption`), else "". A folder's `train` and
`validation` splits are disjoint and fixed: an image is in validation when a hash of its relative path falls below
`val_fraction` (at least one image goes to validation when there are two or more). `builtin:shapes` has its own
fixed splits (data/builtin_shapes.py). For a hub or saved dataset, `split` names one of its own splits.

Items are {"image": uint8 (3, image_size, image_size), "caption": str, "source_id": str} plus the shape attributes
for builtin:shapes. Images are resized (shorter side to image_size, Lanczos) and centre-cropped; transparent
pixels are composited on white. An image that cannot be decoded is skipped with its reason, never fatal.
"""

import csv
import dataclasses
import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from data.builtin_shapes import BUILTIN_SHAPES_NAME, SPLITS, ShapeSpec, draw_shape, shape_specs
from data.saved_datasets import DataSourceError, load_saved_dataset, one_line, split_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
BUILTIN_DEFAULT_IMAGES = {"train": 10_000, "validation": 500}
OFFLINE_ALTERNATIVES = ("use --input_dir DIR (a folder of images), --from_disk DIR (a dataset saved with "
                        f"save_to_disk) or --dataset_name {BUILTIN_SHAPES_NAME} instead")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image to load (picklable, for worker processes): exactly one of `path` (a file), `data` (encoded
    bytes) or `shape` (a builtin:shapes spec to draw)."""

    source_id: str
    caption: str = ""
    path: str | None = None
    data: bytes | None = None
    shape: ShapeSpec | None = None


def load_image_item(record: ImageRecord, image_size: int) -> tuple[dict | None, dict | None]:
    """(item, None), or (None, {"source_id", "reason"}) when the image cannot be decoded. item: "image" uint8
    (3, S, S), "caption", "source_id", and the shape attributes for builtin:shapes."""
    if record.shape is not None:
        image = draw_shape(record.shape, image_size)
    else:
        try:
            with Image.open(record.path if record.data is None else io.BytesIO(record.data)) as opened:
                opened.load()
                image = ImageOps.fit(_as_rgb(ImageOps.exif_transpose(opened)), (image_size, image_size),
                                     method=Image.Resampling.LANCZOS)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return None, {"source_id": record.source_id, "reason": f"{type(error).__name__}: {one_line(error)}"}
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    item = {"image": pixels, "caption": record.caption, "source_id": record.source_id}
    if record.shape is not None:
        item.update(record.shape.attributes())
    return item, None


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Exactly one of `dataset_name` (a hub name, a local path `load_dataset` reads, or builtin:shapes),
    `input_dir` or `from_disk`. `max_images` caps the images read (builtin:shapes: BUILTIN_DEFAULT_IMAGES)."""

    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    input_dir: str | None = None
    from_disk: str | None = None
    image_column: str = "image"
    caption_column: str | None = "text"  # None: no captions (every caption is "")
    max_images: int | None = None
    val_fraction: float = 0.05

    def __post_init__(self):
        given = [name for name in ("dataset_name", "input_dir", "from_disk") if getattr(self, name)]
        if len(given) != 1:
            raise DataSourceError(f"give exactly one of --dataset_name, --input_dir, --from_disk "
                                  f"(got {', '.join(given) or 'none'})")
        if self.dataset_name and self.dataset_name.startswith("builtin:") and self.dataset_name != BUILTIN_SHAPES_NAME:
            raise DataSourceError(f"unknown built-in dataset {self.dataset_name!r}; the image one is "
                                  f"{BUILTIN_SHAPES_NAME}")
        if self.kind in ("builtin", "folder") and self.split not in SPLITS:
            raise DataSourceError(f"--split must be one of {', '.join(SPLITS)} for {self.kind} sources, "
                                  f"got {self.split!r}")
        if self.max_images is not None and self.max_images <= 0:
            raise DataSourceError(f"--max_images must be positive, got {self.max_images}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataSourceError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("input_dir", "from_disk"):
            if getattr(self, name) and not Path(getattr(self, name)).is_dir():
                raise FileNotFoundError(f"--{name} {getattr(self, name)} is not a directory")
        if self.input_dir:
            self.folder_images()  # fails now, before any work, if there are none

    @property
    def kind(self) -> str:
        if self.dataset_name == BUILTIN_SHAPES_NAME:
            return "builtin"
        return "hub" if self.dataset_name else "folder" if self.input_dir else "from_disk"

    @property
    def num_images(self) -> int | None:
        """How many records `records()` yields, where known before reading (builtin and folder sources)."""
        if self.kind == "builtin":
            return self.max_images or BUILTIN_DEFAULT_IMAGES[self.split]
        if self.kind == "folder":
            count = len(self.folder_split()[self.split])
            return min(count, self.max_images) if self.max_images else count
        return None

    def describe(self) -> dict:
        """The source as a JSON-able dict (for meta.json): its kind and the fields that apply to it."""
        relevant = {"builtin": ("dataset_name", "split", "max_images"),
                    "folder": ("input_dir", "split", "caption_column", "max_images", "val_fraction"),
                    "hub": ("dataset_name", "dataset_config", "split", "image_column", "caption_column", "max_images"),
                    "from_disk": ("from_disk", "split", "image_column", "caption_column", "max_images")}[self.kind]
        return {"kind": self.kind, **{key: getattr(self, key) for key in relevant if getattr(self, key) is not None}}

    def records(self) -> Iterator[ImageRecord]:
        """The records of the split, in a fixed order, at most max_images (builtin: its default count)."""
        if self.kind == "builtin":
            specs = itertools.islice(shape_specs(self.split), self.num_images)
            return (ImageRecord(f"{BUILTIN_SHAPES_NAME}/{index}", spec.caption, shape=spec) for index, spec in specs)
        readers = {"hub": self._hub_records, "folder": self._folder_records, "from_disk": self._disk_records}
        return itertools.islice(readers[self.kind](), self.max_images)

    # ----- folders -----
    def folder_images(self) -> list[Path]:
        """The images under input_dir (recursive), sorted by relative path; an error if there are none."""
        root = Path(self.input_dir)
        images = sorted((path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
                        key=lambda path: path.relative_to(root).as_posix())
        if not images:
            raise DataSourceError(f"--input_dir {self.input_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return images

    def folder_split(self) -> dict[str, list[Path]]:
        """The folder's images by split: validation when the hash of the relative path is below val_fraction."""
        root = Path(self.input_dir)
        scores = {path: _unit_hash(path.relative_to(root).as_posix()) for path in self.folder_images()}
        validation = {path for path, score in scores.items() if score < self.val_fraction}
        if not validation and len(scores) > 1:
            validation = {min(scores, key=scores.get)}
        return {"train": [path for path in scores if path not in validation],
                "validation": [path for path in scores if path in validation]}

    def _folder_records(self) -> Iterator[ImageRecord]:
        root = Path(self.input_dir)
        metadata = _folder_metadata(root, self.caption_column)
        for path in self.folder_split()[self.split]:
            caption_file = path.with_suffix(".txt")
            if caption_file.is_file():
                caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
            else:
                caption = metadata.get(path.resolve(), "")
            yield ImageRecord(path.relative_to(root).as_posix(), caption, path=str(path))

    # ----- datasets -----
    def _disk_records(self) -> Iterator[ImageRecord]:
        dataset, _ = load_saved_dataset(self.from_disk, self.split)
        yield from self._dataset_records(dataset, f"--from_disk {self.from_disk}")

    def _hub_records(self) -> Iterator[ImageRecord]:
        import datasets

        where = f"dataset {self.dataset_name!r}"
        try:
            dataset = datasets.load_dataset(self.dataset_name, self.dataset_config, split=split_name(self.split),
                                            streaming=True)
            rows = self._dataset_records(dataset, where)
            first = next(rows, None)
        except DataSourceError:
            raise
        except Exception as error:
            raise DataSourceError(f"could not load {where} ({type(error).__name__}: {one_line(error)}); "
                                  f"without hub access {OFFLINE_ALTERNATIVES}") from error
        if first is not None:
            yield first
            yield from rows

    def _dataset_records(self, dataset, where: str) -> Iterator[ImageRecord]:
        """Records of a datasets.Dataset or IterableDataset; images are read undecoded (decoded in workers)."""
        import datasets

        columns = list(dataset.features or {}) or None
        for column in (self.image_column, self.caption_column):
            if column is not None and columns is not None and column not in columns:
                flag = "--image_column" if column == self.image_column else "--caption_column"
                extra = " (or --caption_column none for no captions)" if flag == "--caption_column" else ""
                raise DataSourceError(f"{where} has no column {column!r} (has {columns}); pick it with {flag}{extra}")
        if isinstance(dataset.features.get(self.image_column) if dataset.features else None, datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        for index, row in enumerate(dataset):
            caption = row.get(self.caption_column) if self.caption_column else ""
            if caption is not None and not isinstance(caption, str):
                raise DataSourceError(f"{where}: column {self.caption_column!r} holds {type(caption).__name__}, not "
                                      "text; pick the caption column with --caption_column")
            yield _dataset_record(row[self.image_column], f"{self.split}/{index}", caption or "", where)


def _dataset_record(value, source_id: str, caption: str, where: str) -> ImageRecord:
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return ImageRecord(source_id, caption, data=value["bytes"])
        return ImageRecord(source_id, caption, path=value["path"])
    if isinstance(value, bytes):
        return ImageRecord(source_id, caption, data=value)
    if isinstance(value, Image.Image):
        encoded = io.BytesIO()
        value.save(encoded, format="PNG")
        return ImageRecord(source_id, caption, data=encoded.getvalue())
    raise DataSourceError(f"{where}: the image column holds {type(value).__name__}, not an image; pick the image "
                          "column with --image_column")


def _folder_metadata(root: Path, caption_column: str | None) -> dict[Path, str]:
    """Captions from every metadata.csv / metadata.jsonl under root: resolved image path -> caption."""
    captions = {}
    for metadata in sorted(path for name in METADATA_FILES for path in root.rglob(name)):
        for line, row in _metadata_rows(metadata):
            if "file_name" not in row:
                raise DataSourceError(f"{metadata}:{line}: no 'file_name' field (has {sorted(row)})")
            column = next((key for key in (caption_column, "text", "caption") if key and key in row), None)
            if column is None:
                raise DataSourceError(f"{metadata}:{line}: no caption field ({caption_column or 'text'} or "
                                      f"caption; has {sorted(row)}); pick it with --caption_column")
            captions[(metadata.parent / row["file_name"]).resolve()] = str(row[column] or "").strip()
    return captions


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as lines:
        if path.suffix == ".csv":
            for line, row in enumerate(csv.DictReader(lines), start=2):
                yield line, row
            return
        for line, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataSourceError(f"{path}:{line}: not valid JSON ({error})") from error
            if not isinstance(row, dict):
                raise DataSourceError(f"{path}:{line}: each line must be a JSON object, got {type(row).__name__}")
            yield line, row


def _unit_hash(text: str) -> float:
    """A fixed pseudo-random number in [0, 1) for `text`."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def add_image_source_arguments(parser, sources) -> None:
    """The flags that choose and read an image source, shared by the preprocess_image_*.py scripts: --dataset_name,
    --input_dir and --from_disk go into `sources` (a mutually exclusive group), the rest into `parser`."""
    sources.add_argument("--dataset_name", help=f"Hugging Face dataset name or local path, or {BUILTIN_SHAPES_NAME}")
    sources.add_argument("--input_dir", help="folder of images (recursive), captions in .txt files or metadata.csv/"
                                             "metadata.jsonl")
    sources.add_argument("--from_disk", metavar="DIR", help="a dataset saved with datasets' save_to_disk")
    parser.add_argument("--dataset_config", help="Hugging Face dataset config name")
    parser.add_argument("--image_column", default="image", help="image column of a hub or saved dataset")
    parser.add_argument("--caption_column", default="text",
                        help="caption column of a dataset or metadata file; 'none' for no captions")
    parser.add_argument("--image_size", type=int, default=256, help="side of the square images")
    parser.add_argument("--max_images", type=int,
                        help=f"read at most this many images ({BUILTIN_SHAPES_NAME}: default "
                             f"{BUILTIN_DEFAULT_IMAGES['train']:,} train, {BUILTIN_DEFAULT_IMAGES['validation']:,} "
                             "validation)")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="fraction of a folder's images (by a hash of their path) in its validation split")
    parser.add_argument("--num_workers", type=int, default=0, help="processes decoding images (0: this one)")


def image_source_from_args(args, split: str) -> ImageSource:
    """The ImageSource the flags of add_image_source_arguments describe, reading `split`."""
    caption_column = None if args.caption_column.lower() == "none" else args.caption_column
    return ImageSource(dataset_name=args.dataset_name, dataset_config=args.dataset_config, split=split,
                       input_dir=args.input_dir, from_disk=args.from_disk, image_column=args.image_column,
                       caption_column=caption_column, max_images=args.max_images, val_fraction=args.val_fraction)
