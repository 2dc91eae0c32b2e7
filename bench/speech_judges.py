"""Judge text-to-speech on builtin:phrases with independent judges (training/speech_judges.py): pocketsphinx's word
error rate and a resemblyzer nearest-centroid speaker judge, on real recordings (the judges' ceiling) and, given a
pretrain_audio_diffusion.py run, on the speech it generates for the same held-out prompts and on the speech it
generates with an empty prompt (the floor).

    python bench/speech_judges.py --num_items 200                      # the ceiling alone: real recordings
    python bench/speech_judges.py --run_dir runs/phrases_dit \\
        --vocoder_checkpoint runs/phrases_vocoder/checkpoint-3000 --num_items 64 --steps 25
    python bench/speech_judges.py --listing runs/wm_audio/wm_speech_eval/prompts.tsv   # wavs made elsewhere

Items: the first --num_items builtin:phrases validation utterances (data/builtin_phrases.py: prompts never heard in
training, each spoken by one of the four flite voices at its own rate). Real: the utterance as flite speaks it.
Generated: the run speaks its prompt as generate_audio.py does (model/audio/pipeline.TextToSpeech; seed = the
item's index, length from the prompt) in the voice of a real train utterance of the same voice (the voice's first
one, written to OUTPUT_DIR/speaker-VOICE.wav and read back as generate_audio.py reads --speaker). Empty prompt: the
same with prompt "" and the generated clip's length, scored against the item's prompt.

WER, two ways (errors / reference words over all items):
  grammar  pocketsphinx restricted to "<colour> <object> <digit>" (JSGF from the corpus' word lists). The primary
           figure: on real flite speech it is near 0, a guess scores CHANCE (one word of each slot at random:
           (7/8 + 7/8 + 9/10) / 3 = 88%), and it asks exactly what the corpus teaches: which words were said.
  open     pocketsphinx with its general English 3-gram model: no knowledge of the corpus, so its ceiling on
           three isolated words is far from 0 (see bench/RESULTS.md); reported beside the grammar's.
Speaker: accuracy of assigning each clip to its conditioning voice by the nearest centroid (cosine) of the
resemblyzer embeddings of --centroid_items real train utterances (4 voices: chance is 25%).

--listing judges wavs made elsewhere (bench/wm_speech_eval.py's prompts.tsv): tab-separated rows of index,
speaker, transcript and one or more wav paths (relative to the listing's folder); each wav column is a set named by
its paths' folder (tts, real). The speakers must be builtin:phrases' voices.

Prints the table (overall and per voice) and writes OUTPUT_DIR/judges.json (default: RUN_DIR/speech_judges, or
runs/speech_judges without a run) with every clip's transcripts; the wavs go under OUTPUT_DIR/{real,generated,
empty_prompt}/. Generated audio at a rate other than 16 kHz is resampled to 16 kHz for pocketsphinx.
"""

import argparse
import sys
from pathlib import Path

import soundfile
import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import measure_and_report  # noqa: E402
from data.audio_sources import AudioRecord, decode_record  # noqa: E402
from data.builtin_phrases import COLOURS, DIGITS, OBJECTS, SPEAKERS, phrase_utterances  # noqa: E402
from data.builtin_speech import synthesize  # noqa: E402
from model.audio.pipeline import TextToSpeech  # noqa: E402
from model.audio.speaker_encoders import ResemblyzerEncoder  # noqa: E402
from training.checkpoints import checkpoint_from_args  # noqa: E402
from training.distributed import choose_device  # noqa: E402
from training.speech_judges import RECOGNISER_RATE, SpeakerJudge, SpeechRecognizer, word_errors  # noqa: E402

SLOTS = (COLOURS, OBJECTS, DIGITS)
CHANCE_WER = sum(1 - 1 / len(slot) for slot in SLOTS) / len(SLOTS)
MODES = ("grammar", "open")
LABELS = {"real": "real recordings (ceiling)", "generated": "generated", "empty_prompt": "empty prompt (floor)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a pretrain_audio_diffusion.py run trained on builtin:phrases (its newest "
                                          "checkpoint); without it only the real recordings are judged")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--vocoder_checkpoint", help="the vocoder for generated speech (needed with --run_dir)")
    parser.add_argument("--num_items", type=int, default=64, help="builtin:phrases validation utterances to judge")
    parser.add_argument("--listing", help="judge the wavs of this TSV (index, speaker, transcript, wav...) instead")
    parser.add_argument("--centroid_items", type=int, default=200,
                        help="real builtin:phrases train utterances for the speaker judge's centroids")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the run config's)")
    parser.add_argument("--guidance_scale", type=float, help="text guidance (default: the run config's)")
    parser.add_argument("--output_dir", help="default RUN_DIR/speech_judges, or runs/speech_judges")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def read_clip(path: Path) -> tuple[torch.Tensor, int]:
    """A wav file -> (mono float32 (S,) at 16 kHz, 16000)."""
    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(samples).mean(dim=1)
    if rate != RECOGNISER_RATE:
        waveform = torchaudio.functional.resample(waveform, rate, RECOGNISER_RATE)
    return waveform, RECOGNISER_RATE


def write_real(items, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(items):
        samples, rate = synthesize(item)
        paths.append(folder / f"{index:03d}-{item.voice}.wav")
        soundfile.write(str(paths[-1]), samples, rate)
    return paths


def write_generated(args, items, speaker_clips: dict, output_dir: Path) -> dict[str, list[Path]]:
    """Speak every item's prompt, then no prompt at the same length, with the run, conditioned on the first of
    speaker_clips[voice] ({voice: [(waveform (S,), rate), ...]}); {set name: wav paths}."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must not be negative, got {args.guidance_scale}")
    tts = TextToSpeech(checkpoint_from_args(args, "pretrain_audio_diffusion.py"), args.vocoder_checkpoint,
                       choose_device(args.device))
    references = {}
    for voice, clips in speaker_clips.items():
        path = output_dir / f"speaker-{voice}.wav"
        soundfile.write(str(path), clips[0][0].numpy(), clips[0][1])
        references[voice] = decode_record(AudioRecord(source_id=str(path), path=str(path)))
    paths = {"generated": [], "empty_prompt": []}
    for index, item in enumerate(items):
        seconds = None
        for name, prompt in (("generated", item.text), ("empty_prompt", "")):
            path = output_dir / name / f"{index:03d}-{item.voice}.wav"
            speech = tts.speak(prompt, references[item.voice], seconds, args.steps, index, args.guidance_scale)
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), speech.audio, tts.sample_rate)
            seconds = round(len(speech.audio) / tts.sample_rate, 4)
            paths[name].append(path)
    return paths


def judge(rows: list[tuple], recognisers: dict, speaker_judge: SpeakerJudge) -> dict:
    """rows: (speaker, reference text, wav path) -> {"clips": per clip (path, speaker, text, transcripts, judged
    speaker), "overall" and "per_speaker": {"wer_grammar", "wer_open", "speaker_accuracy", "clips"}}."""
    clips = []
    for speaker, text, path in rows:
        clip = read_clip(path)
        transcripts = {mode: recognisers[mode].transcribe(*clip) for mode in MODES}
        clips.append({"path": str(path), "speaker": speaker, "text": text, "transcripts": transcripts,
                      "errors": {mode: word_errors(text, transcripts[mode])[0] for mode in MODES},
                      "words": len(text.split()), "judged_speaker": speaker_judge.classify([clip])[0]})
    summary = {"clips": clips, "overall": summarise(clips)}
    summary["per_speaker"] = {voice: summarise([clip for clip in clips if clip["speaker"] == voice])
                              for voice, _ in SPEAKERS if any(clip["speaker"] == voice for clip in clips)}
    return summary


def read_listing(path: Path) -> dict[str, list[tuple]]:
    """A TSV of index, speaker, transcript, wav... -> {set name (the wav column's folder): [(speaker, transcript,
    wav path)]}; ValueError for a malformed row or an unknown speaker."""
    voices = [voice for voice, _ in SPEAKERS]
    sets = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 4 or not fields[2].strip():
            raise ValueError(f"{path}:{number}: expected index, speaker, transcript and at least one wav path "
                             f"(tab-separated), got {line!r}")
        if fields[1] not in voices:
            raise ValueError(f"{path}:{number}: speaker {fields[1]!r} is not a builtin:phrases voice "
                             f"({', '.join(voices)}): the speaker judge knows only those")
        for wav in fields[3:]:
            name = Path(wav).parent.name or "listed"
            sets.setdefault(name, []).append((fields[1], fields[2], path.parent / wav))
    if not sets:
        raise ValueError(f"{path} lists no wavs")
    return sets


def summarise(clips: list[dict]) -> dict:
    words = sum(clip["words"] for clip in clips)
    return {**{f"wer_{mode}": sum(clip["errors"][mode] for clip in clips) / words for mode in MODES},
            "speaker_accuracy": sum(clip["judged_speaker"] == clip["speaker"] for clip in clips) / len(clips),
            "clips": len(clips)}


def measure(args) -> dict:
    if args.num_items < 1 or args.centroid_items < len(SPEAKERS):
        raise ValueError(f"--num_items must be at least 1 and --centroid_items at least {len(SPEAKERS)} (one per "
                         f"voice), got {args.num_items} and {args.centroid_items}")
    if (args.run_dir or args.checkpoint) and not args.vocoder_checkpoint:
        raise ValueError("--run_dir needs --vocoder_checkpoint: the vocoder that turns generated mels into speech")
    if args.listing and (args.run_dir or args.checkpoint):
        raise ValueError("give --listing (wavs made elsewhere) or --run_dir (generate here), not both")
    run = args.run_dir or (str(Path(args.checkpoint).parent) if args.checkpoint else None)
    default_dir = Path(run) / "speech_judges" if run else Path(args.listing).parent if args.listing else None
    output_dir = Path(args.output_dir or default_dir or "runs/speech_judges")
    listed = read_listing(Path(args.listing)) if args.listing else None
    centroid_clips = {}
    for item in phrase_utterances("train", args.centroid_items):
        samples, rate = synthesize(item)
        centroid_clips.setdefault(item.voice, []).append((torch.from_numpy(samples), rate))
    speaker_judge = SpeakerJudge.fit(ResemblyzerEncoder(), centroid_clips)
    recognisers = {"grammar": SpeechRecognizer(grammar=SLOTS), "open": SpeechRecognizer()}
    if listed is None:
        items = list(phrase_utterances("validation", args.num_items))
        paths = {"real": write_real(items, output_dir / "real")}
        if run:
            paths.update(write_generated(args, items, centroid_clips, output_dir))
        listed = {name: [(item.voice, item.text, path) for item, path in zip(items, wavs)]
                  for name, wavs in paths.items()}
    results = {name: judge(rows, recognisers, speaker_judge) for name, rows in listed.items()}
    return {"output_dir": str(output_dir), "run": run, "listing": args.listing,
            "centroid_items": args.centroid_items, "chance_wer_grammar": CHANCE_WER,
            "chance_speaker_accuracy": 1 / len(SPEAKERS), "sets": results}


def print_table(report: dict, path: Path) -> None:
    print(f"{'':28} {'WER grammar':>11} {'WER open':>9} {'speaker':>8} {'clips':>6}")
    for name, result in report["sets"].items():
        label = name if report["listing"] else LABELS.get(name, name)  # a listing's sets are its wav folders
        for key, figures in [("", result["overall"])] + list(result["per_speaker"].items()):
            title = label if not key else f"  {key}"
            print(f"{title:28} {figures['wer_grammar']:11.1%} {figures['wer_open']:9.1%} "
                  f"{figures['speaker_accuracy']:8.1%} {figures['clips']:6d}")
    print(f"{'chance':28} {report['chance_wer_grammar']:11.1%} {'':>9} {report['chance_speaker_accuracy']:8.1%}")
    print(f"\nwritten: {path} and the wavs under {report['output_dir']}/")


def main(argv=None) -> int:
    return measure_and_report(build_parser(), measure,
                              lambda args, report: Path(report["output_dir"]) / "judges.json", print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
