"""Clips for analysis-synthesis evaluation from a folder of audio files (evaluate_vocoder.py --input_dir).

    clips, skipped = folder_clips("inference/examples", features)
    clips[0]    # {"waveform": (S,) float32 at features.sample_rate, "mel": (n_mels, 1 + S // hop) = log_mel,
                #  "source_id": the file's path relative to the folder}
    skipped     # [{"source_id": ..., "reason": ...}] for each file that gave no clip

Every .wav/.flac/.ogg file under the folder (recursive, sorted by relative path) is decoded as the cache
preprocessors decode (data/audio_sources.decode_record: mixed to mono, checked finite), resampled to the
features' rate with torchaudio and zero-padded at the end to a multiple of the hop, so the vocoder's
(T - 1) * hop samples cover the whole file: the same mel a vocoder cache or vocode.py would give. A file
that cannot be read, holds no samples or is too short for the STFT (n_fft / 2 samples or fewer) is skipped
with its reason; a folder without any audio file is an error.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

from data.audio_sources import AUDIO_SUFFIXES, AudioDecodeError, AudioRecord, decode_record
from model.audio.features import AudioFeatureConfig, log_mel


def audio_files(folder) -> list[Path]:
    """The .wav/.flac/.ogg files under `folder`, sorted by relative path. FileNotFoundError when the folder
    does not exist, ValueError when it holds no audio file."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--input_dir {root} does not exist or is not a directory; give a folder of "
                                f"{'/'.join(AUDIO_SUFFIXES)} files")
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"--input_dir {root} holds no {'/'.join(AUDIO_SUFFIXES)} files")
    return files


def folder_clips(folder, features: AudioFeatureConfig) -> tuple[list[dict], list[dict]]:
    """(clips, skipped) for every audio file under `folder`; see the module docstring."""
    root = Path(folder)
    clips, skipped = [], []
    for path in audio_files(root):
        source_id = path.relative_to(root).as_posix()
        try:
            waveform, rate = decode_record(AudioRecord(source_id, path=str(path)))
        except AudioDecodeError as error:
            skipped.append({"source_id": source_id, "reason": str(error)})
            continue
        if rate != features.sample_rate:
            waveform = torchaudio.functional.resample(waveform, rate, features.sample_rate)
        if waveform.numel() <= features.n_fft // 2:
            skipped.append({"source_id": source_id, "reason": f"too short ({waveform.numel()} samples at "
                                                              f"{features.sample_rate} Hz; the STFT needs more "
                                                              f"than n_fft / 2 = {features.n_fft // 2})"})
            continue
        padded = F.pad(waveform, (0, -waveform.numel() % features.hop_length))
        clips.append({"waveform": padded, "mel": log_mel(padded, features), "source_id": source_id})
    return clips, skipped
