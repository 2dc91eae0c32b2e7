"""Where text documents come from: a Hugging Face dataset, local files, a saved dataset, or `builtin:text`.

    source = TextSource(input_dir="my_corpus", max_chars=1_000_000)
    for document in source.documents():   # a fresh iterator each call (preprocessing reads twice)
        ...

Local files: a `.txt` file is one document; each line of a `.jsonl` file and each row of a `.parquet`
file is one document, read from `text_column`. A missing value counts as an empty document (the cache
writer skips and counts those).
"""

import dataclasses
import glob
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from data.builtin_text import BUILTIN_TEXT_NAME, iter_builtin_documents
from data.saved_datasets import DataSourceError, load_saved_dataset, one_line, split_name

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
OFFLINE_ALTERNATIVES = ("use --from_disk DIR (a dataset saved with save_to_disk), --input_dir DIR (local "
                        f".txt/.jsonl/.parquet files) or --dataset_name {BUILTIN_TEXT_NAME} instead")


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Exactly one of `dataset_name` (a hub name or `builtin:text`), `input_dir`, `input_files` (glob
    patterns) or `from_disk`. `split` picks the split of a hub or saved dataset (`val` means `validation`).
    `max_documents` and `max_chars` cap the corpus (the document that crosses `max_chars` is cut)."""

    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    input_dir: str | None = None
    input_files: tuple[str, ...] | None = None
    from_disk: str | None = None
    text_column: str = "text"
    max_documents: int | None = None
    max_chars: int | None = None

    def __post_init__(self):
        given = [name for name in ("dataset_name", "input_dir", "input_files", "from_disk") if getattr(self, name)]
        if len(given) != 1:
            raise DataSourceError(f"give exactly one of --dataset_name, --input_dir, --input_files, --from_disk "
                                  f"(got {', '.join(given) or 'none'})")
        if self.dataset_name and self.dataset_name.startswith("builtin:") and self.dataset_name != BUILTIN_TEXT_NAME:
            raise DataSourceError(f"unknown built-in dataset {self.dataset_name!r}; the text one is {BUILTIN_TEXT_NAME}")
        for name in ("max_documents", "max_chars"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise DataSourceError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("input_dir", "from_disk"):
            if getattr(self, name) and not Path(getattr(self, name)).is_dir():
                raise FileNotFoundError(f"--{name} {getattr(self, name)} is not a directory")
        if self.input_dir or self.input_files:
            self.local_files()  # fails now, before any work, if nothing matches

    @property
    def kind(self) -> str:
        if self.dataset_name == BUILTIN_TEXT_NAME:
            return "builtin"
        return "hub" if self.dataset_name else "local" if (self.input_dir or self.input_files) else "from_disk"

    def describe(self) -> dict:
        """The source as a JSON-able dict (for meta.json): its kind and the fields that were given."""
        fields = {key: value for key, value in dataclasses.asdict(self).items() if value is not None}
        if isinstance(fields.get("input_files"), tuple):
            fields["input_files"] = list(fields["input_files"])
        return {"kind": self.kind, **fields}

    def documents(self) -> Iterator[str]:
        """A fresh iterator over the documents, in a fixed order, with the caps applied."""
        readers = {"builtin": iter_builtin_documents, "hub": self._hub_documents,
                   "local": self._local_documents, "from_disk": self._disk_documents}
        return _capped(readers[self.kind](), self.max_documents, self.max_chars)

    def local_files(self) -> list[Path]:
        """The files of `input_dir` (recursive) or `input_files`, sorted; an error if there are none."""
        if self.input_dir:
            files = sorted(path for path in Path(self.input_dir).rglob("*")
                           if path.suffix in LOCAL_SUFFIXES and path.is_file())
            if not files:
                raise DataSourceError(f"--input_dir {self.input_dir} holds no {'/'.join(LOCAL_SUFFIXES)} files")
            return files
        files = []
        for pattern in self.input_files:
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
            if not matches:
                raise DataSourceError(f"--input_files pattern {pattern!r} matches no file")
            unsupported = [str(path) for path in matches if path.suffix not in LOCAL_SUFFIXES]
            if unsupported:
                raise DataSourceError(f"unsupported file type {unsupported[0]}; use {'/'.join(LOCAL_SUFFIXES)} files")
            files.extend(matches)
        return files

    def _local_documents(self) -> Iterator[str]:
        for path in self.local_files():
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8", errors="replace")
            elif path.suffix == ".jsonl":
                yield from self._jsonl_documents(path)
            else:
                yield from self._parquet_documents(path)

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataSourceError(f"{path}:{line_number}: not valid JSON ({error})") from error
                if not isinstance(row, dict) or self.text_column not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataSourceError(f"{path}:{line_number}: no {self.text_column!r} field (has {keys}); "
                                          "pick the field with --text_column")
                yield self._text(row[self.text_column], f"{path}:{line_number}")

    def _parquet_documents(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet

        parquet = pyarrow.parquet.ParquetFile(path)
        if self.text_column not in parquet.schema_arrow.names:
            raise DataSourceError(f"{path} has no column {self.text_column!r} (has {parquet.schema_arrow.names}); "
                                  "pick the column with --text_column")
        for batch in parquet.iter_batches(columns=[self.text_column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield self._text(value, str(path))

    def _disk_documents(self) -> Iterator[str]:
        dataset, _ = load_saved_dataset(self.from_disk, self.split)
        if self.text_column not in dataset.column_names:
            raise DataSourceError(f"--from_disk {self.from_disk} has no column {self.text_column!r} "
                                  f"(has {dataset.column_names}); pick the column with --text_column")
        for batch in dataset.select_columns([self.text_column]).iter(batch_size=1024):
            for value in batch[self.text_column]:
                yield self._text(value, self.from_disk)

    def _hub_documents(self) -> Iterator[str]:
        import datasets

        where = f"Hugging Face dataset {self.dataset_name!r}"
        try:
            dataset = datasets.load_dataset(self.dataset_name, self.dataset_config, split=split_name(self.split),
                                            streaming=True)
            rows = iter(dataset)
            first = next(rows, None)
        except Exception as error:
            raise DataSourceError(f"could not load {where} ({type(error).__name__}: {one_line(error)}); "
                                  f"without hub access {OFFLINE_ALTERNATIVES}") from error
        for row in itertools.chain([first] if first is not None else [], rows):
            if self.text_column not in row:
                raise DataSourceError(f"{where} has no column {self.text_column!r} (has {sorted(row)}); "
                                      "pick the column with --text_column")
            yield self._text(row[self.text_column], where)

    @staticmethod
    def _text(value, where: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataSourceError(f"{where}: the text column holds {type(value).__name__}, not text; "
                                  "pick a text column with --text_column")
        return value


def _capped(documents: Iterator[str], max_documents: int | None, max_chars: int | None) -> Iterator[str]:
    """At most `max_documents` documents and `max_chars` characters (the last document is cut to fit)."""
    chars = 0
    for count, document in enumerate(documents):
        if max_documents is not None and count >= max_documents:
            return
        if max_chars is not None and chars + len(document) >= max_chars:
            yield document[:max_chars - chars]
            return
        chars += len(document)
        yield document
