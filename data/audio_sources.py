"""Where audio comes from, and how a source item becomes clean fixed-rate segments; shared by every audio
preprocessor (vocoder, audio VAE, audio diffusion).

    source = AudioSource(input_dir="my_wavs", split="train")        # or dataset_name=..., from_disk=...
    segmenting = Segmenting(sample_rate=16000, segment_seconds=4.0)
    for record in source.records():                 # cheap and picklable: decoding happens later, in workers
        loaded = load_segments(record, segmenting)  # decode, mix to mono, resample, cut, drop silence
        loaded.segments                             # {index: (S_i,) float32}; loaded.skipped: reason or None

Sources (exactly one):
- `dataset_name`: a Hugging Face dataset, streamed (default openslr/librispeech_asr, config `clean`); its
  audio column is read undecoded (`Audio(decode=False)`) and decoded here with soundfile.
- `dataset_name="builtin:speech"`: speech synthesised with espeak-ng and flite (data/builtin_speech.py), by
  `voices` (default espeak-ng's 12).
- `input_dir`: a folder of .wav/.flac/.ogg files (recursive, sorted). Transcripts come from a row of
  `metadata.csv` in the folder (columns file_name,text[,speaker]; file_name relative to the folder) or else
  from a `.txt` beside the audio file; the speaker is the metadata's speaker, else the top-level subfolder.
- `from_disk`: a dataset written by `save_to_disk` (audio as bytes or paths, or a column of file paths).

Splits: a hub dataset or a saved DatasetDict has named splits (`val` finds `validation` and back). The
built-in corpus, a folder and a saved single Dataset are split here, deterministically: an item goes to
`validation` when a hash of its key (utterance key, relative path, `id` or row number) is below
`val_fraction`; a folder of two or more files always gives validation at least one (the lowest hash).

An unreadable or corrupt item never stops a run: load_segments() returns it with `skipped` set to the reason.
"""

import csv
import dataclasses
import io
import itertools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from data.builtin_speech import (BUILTIN_SPEECH_NAME, DEFAULT_VOICES, SpeechUnavailableError, Utterance,
                                 hash_fraction, iter_utterances, parse_voices, require_synthesisers, synthesize)
from data.saved_datasets import DataSourceError, load_saved_dataset
from model.audio.features import AudioFeatureConfig

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
METADATA_FILE = "metadata.csv"
DEFAULT_HUB_DATASET = "openslr/librispeech_asr"
DEFAULT_HUB_CONFIG = "clean"
BUILTIN_DEFAULT_ITEMS = {"train": 1000, "validation": 100}
LOCAL_SPLITS = {"train": "train", "validation": "validation", "val": "validation"}
OFFLINE_ALTERNATIVES = ("use --input_dir DIR (a folder of .wav/.flac/.ogg files), --from_disk DIR (a dataset "
                        f"saved with save_to_disk) or --dataset_name {BUILTIN_SPEECH_NAME} (no download) instead")


class AudioDecodeError(ValueError):
    """One item could not be decoded; it is skipped with this message as the reason."""


@dataclasses.dataclass(frozen=True)
class AudioRecord:
    """One source item before decoding: its audio as a file `path`, encoded `data` bytes, or a built-in
    `utterance` to synthesise; plus its transcript and speaker ("" when unknown)."""

    source_id: str
    speaker: str = ""
    text: str = ""
    path: str | None = None
    data: bytes | None = None
    utterance: Utterance | None = None


@dataclasses.dataclass(frozen=True)
class Segmenting:
    """How decoded audio is cut: resampled to `sample_rate`, split into consecutive `segment_seconds` pieces
    (the last one kept if it lasts at least `min_segment_seconds`; a shorter file is skipped), and pieces
    whose RMS level is below `silence_db` dBFS dropped."""

    sample_rate: int
    segment_seconds: float = 4.0
    min_segment_seconds: float = 1.0
    silence_db: float = -50.0

    def __post_init__(self):
        if self.sample_rate < 1:
            raise ValueError(f"--sample_rate must be positive, got {self.sample_rate}")
        if not 0 < self.min_segment_seconds <= self.segment_seconds:
            raise ValueError(f"need 0 < --min_segment_seconds <= --segment_seconds, got {self.min_segment_seconds} "
                             f"and {self.segment_seconds}")

    @property
    def segment_samples(self) -> int:
        return round(self.segment_seconds * self.sample_rate)

    @property
    def min_segment_samples(self) -> int:
        return max(1, round(self.min_segment_seconds * self.sample_rate))


@dataclasses.dataclass
class LoadedAudio:
    """What load_segments made of a record: `segments` {k: (S_k,) float32 at the target rate}, where piece k
    starts at k * segment_seconds (silent pieces are missing); `silent_segments` (silent pieces dropped from a
    record that kept others); `skipped` (why the record gave no piece) or None."""

    record: AudioRecord
    segments: dict[int, torch.Tensor]
    silent_segments: int = 0
    skipped: str | None = None


def decode_record(record: AudioRecord) -> tuple[torch.Tensor, int]:
    """The record's audio mixed to mono: (waveform float32 (S,), sample_rate). AudioDecodeError if it cannot be
    read, is empty, or holds non-finite samples."""
    try:
        if record.utterance is not None:
            samples, sample_rate = synthesize(record.utterance)
        else:
            samples, sample_rate = soundfile.read(io.BytesIO(record.data) if record.data is not None else record.path,
                                                  dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, SpeechUnavailableError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise AudioDecodeError(f"unreadable ({type(error).__name__}: {' '.join(str(error).split())})") from error
    waveform = torch.from_numpy(np.ascontiguousarray(samples))
    waveform = waveform.mean(dim=1) if waveform.dim() == 2 else waveform
    if waveform.numel() == 0:
        raise AudioDecodeError("no samples")
    if not torch.isfinite(waveform).all():
        raise AudioDecodeError("non-finite samples (NaN or inf)")
    return waveform, int(sample_rate)


def rms_db(waveform: torch.Tensor) -> float:
    """RMS level in dBFS (full scale = 1.0) of waveform (S,); -inf for digital silence."""
    rms = float(waveform.double().square().mean().sqrt())
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def load_segments(record: AudioRecord, segmenting: Segmenting) -> LoadedAudio:
    """Decode, resample (torchaudio.functional.resample) and cut one record (see Segmenting). Never raises for
    bad audio: the result's `skipped` says why nothing came out."""
    try:
        waveform, sample_rate = decode_record(record)
    except AudioDecodeError as error:
        return LoadedAudio(record, {}, skipped=str(error))
    if sample_rate != segmenting.sample_rate:
        waveform = torchaudio.functional.resample(waveform, sample_rate, segmenting.sample_rate)
    if waveform.numel() < segmenting.min_segment_samples:
        seconds = waveform.numel() / segmenting.sample_rate
        return LoadedAudio(record, {}, skipped=f"too short ({seconds:.2f} s < --min_segment_seconds "
                                               f"{segmenting.min_segment_seconds})")
    pieces = [piece for piece in waveform.split(segmenting.segment_samples)
              if piece.numel() >= segmenting.min_segment_samples]
    levels = [rms_db(piece) for piece in pieces]
    kept = {index: piece.clone() for index, (piece, level) in enumerate(zip(pieces, levels))
            if level >= segmenting.silence_db}
    if not kept:
        return LoadedAudio(record, {}, skipped=f"silent (loudest segment {max(levels):.1f} dBFS < --silence_db "
                                   f"{segmenting.silence_db})")
    return LoadedAudio(record, kept, silent_segments=len(pieces) - len(kept))


@dataclasses.dataclass(frozen=True)
class AudioSource:
    """Exactly one of `dataset_name` (a hub name or builtin:speech), `input_dir` or `from_disk` (see the module
    docstring). `num_items` caps the records read (built-in: how many to synthesise, default 1000 for train
    and 100 for validation). `seed` and `voices` (names or groups, see builtin_speech.parse_voices; None for
    the default ones) pick the built-in corpus."""

    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    input_dir: str | None = None
    from_disk: str | None = None
    audio_column: str = "audio"
    text_column: str = "text"
    speaker_column: str = "speaker_id"
    num_items: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    voices: tuple[str, ...] | None = None

    def __post_init__(self):
        given = [name for name in ("dataset_name", "input_dir", "from_disk") if getattr(self, name)]
        if len(given) != 1:
            raise DataSourceError(f"give exactly one of --dataset_name, --input_dir, --from_disk "
                                  f"(got {', '.join(given) or 'none'})")
        if self.dataset_name and self.dataset_name.startswith("builtin:") and self.dataset_name != BUILTIN_SPEECH_NAME:
            raise DataSourceError(f"unknown built-in dataset {self.dataset_name!r}; the audio one is "
                                  f"{BUILTIN_SPEECH_NAME}")
        if self.num_items is not None and self.num_items <= 0:
            raise DataSourceError(f"--num_items must be positive, got {self.num_items}")
        if not 0 < self.val_fraction < 1:
            raise DataSourceError(f"--val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.kind in ("builtin", "local") and self.split not in LOCAL_SPLITS:
            raise DataSourceError(f"--split for {self.kind} sources is train or validation (val), not {self.split!r}")
        for name in ("input_dir", "from_disk"):
            if getattr(self, name) and not Path(getattr(self, name)).is_dir():
                what = "a folder of .wav/.flac/.ogg files" if name == "input_dir" else "a save_to_disk folder"
                raise FileNotFoundError(f"--{name} {getattr(self, name)} does not exist or is not a directory; "
                                        f"give {what}")
        if self.voices is not None and self.kind != "builtin":
            raise DataSourceError(f"--voices picks the voices of {BUILTIN_SPEECH_NAME}; {self.kind} sources have "
                                  "their own speakers")
        if self.kind == "builtin":
            object.__setattr__(self, "voices", parse_voices(self.voices or DEFAULT_VOICES))
            require_synthesisers(self.voices)
        if self.kind == "local":
            self.local_files()  # fails now, before any work, when the folder or the split is empty

    @property
    def kind(self) -> str:
        if self.dataset_name == BUILTIN_SPEECH_NAME:
            return "builtin"
        return "hub" if self.dataset_name else "local" if self.input_dir else "from_disk"

    @property
    def split_name(self) -> str:
        """The split read: `val` spelled `validation` for sources split here."""
        return LOCAL_SPLITS.get(self.split, self.split) if self.kind in ("builtin", "local") else self.split

    @property
    def expected_items(self) -> int | None:
        """How many records records() will give, where known in advance (built-in source)."""
        return (self.num_items or BUILTIN_DEFAULT_ITEMS[self.split_name]) if self.kind == "builtin" else None

    @property
    def streaming_note(self) -> str | None:
        """The line a CLI prints before reading a hub source (None for the others, which need no network)."""
        if self.kind != "hub":
            return None
        config = f" ({self.dataset_config})" if self.dataset_config else ""
        return (f"streaming {self.dataset_name}{config}, split {self.split}, with datasets.load_dataset (a hub name "
                "needs network access)")

    def describe(self) -> dict:
        """The source as a JSON-able dict (for meta.json)."""
        fields = {key: value for key, value in dataclasses.asdict(self).items() if value is not None}
        return {"kind": self.kind, **fields, "split": self.split_name}

    def records(self) -> Iterator[AudioRecord]:
        """A fresh iterator over the split's records, in a fixed order, at most `num_items`."""
        if self.kind == "builtin":
            return (AudioRecord(item.key, speaker=item.voice, text=item.text, utterance=item)
                    for item in iter_utterances(self.split_name, self.expected_items, self.val_fraction, self.seed,
                                                self.voices))
        readers = {"hub": self._hub_records, "local": self._local_records, "from_disk": self._disk_records}
        return itertools.islice(readers[self.kind](), self.num_items)

    def local_files(self) -> list[Path]:
        """The audio files of `input_dir` in this split, sorted by relative path; an error if there are none."""
        root = Path(self.input_dir)
        files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise DataSourceError(f"--input_dir {root} holds no {'/'.join(AUDIO_SUFFIXES)} files")
        keys = [path.relative_to(root).as_posix() for path in files]
        chosen = _hash_split(keys, self.val_fraction, self.split_name)
        in_split = [path for path, key in zip(files, keys) if key in chosen]
        if not in_split:
            raise DataSourceError(f"--input_dir {root} has {len(files)} audio file(s), none in split "
                                  f"{self.split_name!r}: a folder needs at least 2 files to give both splits")
        return in_split

    def _local_records(self) -> Iterator[AudioRecord]:
        root = Path(self.input_dir)
        metadata = _read_metadata(root / METADATA_FILE)
        for path in self.local_files():
            key = path.relative_to(root).as_posix()
            row = metadata.get(key, {})
            text = row.get("text")
            if text is None and path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
            parts = Path(key).parts
            speaker = row.get("speaker") or (parts[0] if len(parts) > 1 else "")
            yield AudioRecord(key, speaker=speaker, text=text or "", path=str(path))

    def _disk_records(self) -> Iterator[AudioRecord]:
        """Loads the dataset and checks its split and columns now, before any work."""
        dataset, from_split = load_saved_dataset(self.from_disk, self.split)
        keep = None
        if not from_split:  # a single saved Dataset: split here by a hash of each row's key
            if self.split not in LOCAL_SPLITS:
                raise DataSourceError(f"--from_disk {self.from_disk} is a single dataset, split here into train "
                                      f"and validation; --split {self.split!r} is neither")
            keys = [str(key) for key in dataset["id"]] if "id" in dataset.column_names else \
                [str(index) for index in range(len(dataset))]
            keep = _hash_split(keys, self.val_fraction, self.split_name)
        dataset = self._undecoded(dataset, f"--from_disk {self.from_disk}")
        return self._disk_rows(dataset, keep)

    def _disk_rows(self, dataset, keep: set[str] | None) -> Iterator[AudioRecord]:
        """Records of the rows (of those whose key is in `keep`, unless None); a row without an `id` is named
        SPLIT/ROW in a DatasetDict and row-ROW in a single dataset."""
        for index, row in enumerate(dataset):
            key = str(row["id"]) if "id" in row else str(index)
            if keep is None or key in keep:
                name = key if "id" in row else f"{self.split}/{index}" if keep is None else f"row-{index}"
                yield self._row_record(row, name, Path(self.from_disk))

    def _hub_records(self) -> Iterator[AudioRecord]:
        """Opens the dataset and reads its first row now (so a hub failure surfaces before any work)."""
        import datasets

        where = f"Hugging Face dataset {self.dataset_name!r} (config {self.dataset_config!r}, split {self.split!r})"
        try:
            split = "validation" if self.split == "val" else self.split
            dataset = datasets.load_dataset(self.dataset_name, self.dataset_config, split=split, streaming=True)
            rows = iter(self._undecoded(dataset, where))
            first = next(rows, None)
        except DataSourceError:
            raise
        except Exception as error:
            raise DataSourceError(f"could not load {where} ({type(error).__name__}: {' '.join(str(error).split())}); "
                                  f"without hub access {OFFLINE_ALTERNATIVES}") from error
        rows = _reraised(itertools.chain([first] if first is not None else [], rows), where)
        return (self._row_record(row, str(row["id"]) if "id" in row else f"{split}/{index}", None)
                for index, row in enumerate(rows))

    def _undecoded(self, dataset, where: str):
        """`dataset` with its audio column cast to Audio(decode=False), so rows hold {"bytes", "path"}
        (decoding with datasets needs torchcodec; soundfile decodes here instead)."""
        import datasets

        features = dataset.features
        if features is not None and self.audio_column not in features:
            raise DataSourceError(f"{where} has no column {self.audio_column!r} (has {sorted(features)}); pick the "
                                  "audio column with --audio_column")
        if features is not None and isinstance(features[self.audio_column], datasets.Audio):
            dataset = dataset.cast_column(self.audio_column, datasets.Audio(decode=False))
        return dataset

    def _row_record(self, row: dict, source_id: str, base_dir: Path | None) -> AudioRecord:
        value = row.get(self.audio_column)
        if isinstance(value, dict) and value.get("bytes") is not None:
            audio = {"data": value["bytes"]}
        elif isinstance(value, (dict, str)) and (value.get("path") if isinstance(value, dict) else value):
            path = Path(value["path"] if isinstance(value, dict) else value)
            if not path.is_absolute() and base_dir is not None and not path.exists():
                path = base_dir / path
            audio = {"path": str(path)}
        else:
            raise DataSourceError(f"row {source_id}: column {self.audio_column!r} holds {type(value).__name__}, "
                                  "not audio bytes or a path; pick the audio column with --audio_column")
        speaker, text = row.get(self.speaker_column), row.get(self.text_column)
        return AudioRecord(source_id, speaker="" if speaker is None else str(speaker),
                           text="" if text is None else str(text), **audio)


def _reraised(rows: Iterator[dict], where: str) -> Iterator[dict]:
    """`rows`, with an error while streaming them turned into a DataSourceError that says how far it got."""
    count = 0
    try:
        for row in rows:
            yield row
            count += 1
    except Exception as error:
        raise DataSourceError(f"reading {where} failed after {count} rows ({type(error).__name__}: "
                              f"{' '.join(str(error).split())}); re-run, or {OFFLINE_ALTERNATIVES}") from error


def _hash_split(keys: list[str], val_fraction: float, split: str) -> set[str]:
    """The keys in `split`: validation holds those with hash_fraction below val_fraction, or the lowest one
    when none is and there are at least two keys; train holds the rest."""
    fractions = {key: hash_fraction(key) for key in keys}
    validation = {key for key, fraction in fractions.items() if fraction < val_fraction}
    if not validation and len(fractions) > 1:
        validation = {min(fractions, key=fractions.get)}
    return validation if split == "validation" else set(fractions) - validation


def _read_metadata(path: Path) -> dict[str, dict]:
    """metadata.csv rows keyed by file_name (posix path relative to its folder); {} when there is none."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
            raise DataSourceError(f"{path} needs a header with columns file_name,text[,speaker]; found "
                                  f"{reader.fieldnames}")
        rows = {Path(row["file_name"]).as_posix(): row for row in reader if row.get("file_name")}
    logger.info("%s: transcripts for %d files", path, len(rows))
    return rows


def add_audio_source_arguments(parser, *, builtins: str, transcripts_optional: bool, num_items_help: str,
                               val_fraction_help: str, val_fraction_default: float | None = None) -> None:
    """The flags that choose and read an audio source, shared by the audio preprocess_*.py scripts: --dataset_name,
    --input_dir and --from_disk (a mutually exclusive group), --dataset_config, --split, the column flags,
    --num_items, --val_fraction and --seed. `builtins` names the built-in datasets the script takes (with their
    needs, if any); the other arguments are the help and default of the flags whose meaning differs between scripts."""
    sources = parser.add_mutually_exclusive_group()
    sources.add_argument("--dataset_name", help=f"Hugging Face dataset (default {DEFAULT_HUB_DATASET}); built-in, "
                                                f"no download: {builtins}")
    sources.add_argument("--input_dir", help=f"folder of .wav/.flac/.ogg files (recursive), with "
                                             f"{'optional ' if transcripts_optional else ''}.txt transcripts beside "
                                             "them or a metadata.csv (file_name,text[,speaker])")
    sources.add_argument("--from_disk", metavar="DIR", help="a dataset saved with datasets' save_to_disk")
    parser.add_argument("--dataset_config", help=f"hub dataset config (default {DEFAULT_HUB_CONFIG} for "
                                                 f"{DEFAULT_HUB_DATASET})")
    parser.add_argument("--split", default="train", help="hub/saved split (e.g. train.360); built-in and folder "
                                                         "sources: train or validation (val)")
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--speaker_column", default="speaker_id")
    parser.add_argument("--num_items", type=int, help=num_items_help)
    parser.add_argument("--val_fraction", type=float, default=val_fraction_default, help=val_fraction_help)
    parser.add_argument("--seed", type=int, default=0, help="picks the built-in corpus")


def audio_source_from_args(args, **fields) -> AudioSource:
    """The AudioSource the flags of add_audio_source_arguments describe: with none of --dataset_name, --input_dir
    and --from_disk, DEFAULT_HUB_DATASET (config DEFAULT_HUB_CONFIG unless --dataset_config says otherwise).
    `fields` set or replace AudioSource fields the flags do not give as they are (voices, val_fraction)."""
    dataset_name = args.dataset_name or (None if args.input_dir or args.from_disk else DEFAULT_HUB_DATASET)
    config = args.dataset_config or (DEFAULT_HUB_CONFIG if dataset_name == DEFAULT_HUB_DATASET else None)
    flags = dict(dataset_name=dataset_name, dataset_config=config, split=args.split, input_dir=args.input_dir,
                 from_disk=args.from_disk, audio_column=args.audio_column, text_column=args.text_column,
                 speaker_column=args.speaker_column, num_items=args.num_items, val_fraction=args.val_fraction,
                 seed=args.seed)
    return AudioSource(**{**flags, **fields})


def add_audio_feature_arguments(parser, title: str) -> None:
    """--sample_rate, --n_mels, --n_fft, --hop_length, --win_length, --f_min and --f_max (AudioFeatureConfig's
    fields and defaults), in an argument group named `title`."""
    defaults = AudioFeatureConfig()
    features = parser.add_argument_group(title)
    for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        features.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    features.add_argument("--win_length", type=int, help="default n_fft")
    features.add_argument("--f_min", type=float, default=defaults.f_min)
    features.add_argument("--f_max", type=float, help="default sample_rate / 2")


def audio_features_from_args(args) -> AudioFeatureConfig:
    """The AudioFeatureConfig the flags of add_audio_feature_arguments describe."""
    return AudioFeatureConfig(sample_rate=args.sample_rate, n_mels=args.n_mels, n_fft=args.n_fft,
                              hop_length=args.hop_length, win_length=args.win_length, f_min=args.f_min,
                              f_max=args.f_max)
