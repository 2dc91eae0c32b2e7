"""Recognition and text-to-speech of a multimodal world-model run trained with speech (builtin:phrases clips).

    python bench/wm_speech_eval.py --run_dir runs/wm_audio --val_data_dir cached_datasets/wm_audio_val --clips 200 \
        --prompts 8 --vocoder_checkpoint runs/phrases_vocoder/checkpoint-3000

Recognition: the first --clips validation clips of the interleaved validation cache (held-out prompts of
builtin:phrases, as the cache encoded them) are transcribed greedily (generate_wm's path: text after [bos]
begin-audio clip end-audio, the clip's speaker embedding on its span) and scored by word error rate against their
transcripts. The blind baseline answers every clip with the most common transcript of the run's training cache (a
text-only model's best constant guess).

Text-to-speech: the transcripts of --prompts validation clips (taken from each speaker in turn), each spoken in
the voice of its clip
(prompt [bos] transcript begin-audio, the clip's speaker embedding, seed fixed per prompt) at --guidance_scale, and
the real clip decoded through the same audio VAE and vocoder (the ceiling a judge compares against), both cut
after their last sound (data/multimodal_audio.ClipCodec.waveform: vocoded padding sounds like words to a
recogniser; --keep_padding keeps it), written to
OUTPUT_DIR/tts/NNN-SPEAKER.wav and OUTPUT_DIR/real/NNN-SPEAKER.wav with OUTPUT_DIR/prompts.tsv (index, speaker,
transcript, generated, real), for the speech judges (pocketsphinx WER and the speaker judge). Writes
OUTPUT_DIR/wm_speech_eval.json (default <run dir>/wm_speech_eval/).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import soundfile  # noqa: E402
import torch  # noqa: E402

from bench.common import measure_and_report  # noqa: E402
from data.multimodal_batches import IMAGE_FIRST, item_kind  # noqa: E402
from data.multimodal_run import load_run  # noqa: E402
from data.sharded_cache import ShardedCache  # noqa: E402
from model.multimodal.generation import caption_media, text_to_media  # noqa: E402
from training.checkpoints import checkpoint_from_args  # noqa: E402
from training.distributed import choose_device  # noqa: E402
from training.speech_judges import word_errors  # noqa: E402


def wer(references: list[str], hypotheses: list[str]) -> float:
    counts = [word_errors(reference, hypothesis) for reference, hypothesis in zip(references, hypotheses)]
    return sum(errors for errors, _ in counts) / max(sum(words for _, words in counts), 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_wm.py trained with speech (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--val_data_dir", required=True, help="the interleaved validation cache of the run")
    parser.add_argument("--clips", type=int, default=200, help="validation clips to transcribe")
    parser.add_argument("--prompts", type=int, default=8, help="validation transcripts to speak")
    parser.add_argument("--guidance_scale", type=float, help="text-to-speech guidance (default: the config's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--vocoder_checkpoint", help="a pretrain_vocoder.py checkpoint (default: Griffin-Lim)")
    parser.add_argument("--keep_padding", action="store_true",
                        help="write whole clips, silence padding included (default: cut after the speech)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="default: <run dir>/wm_speech_eval")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def by_speaker_in_turn(clips: list[dict]) -> list[dict]:
    """The clips reordered to take the first of each speaker, then the second of each, and so on."""
    queues = {}
    for item in clips:
        queues.setdefault(item["speaker"], []).append(item)
    longest = max(len(queue) for queue in queues.values())
    return [queue[rank] for rank in range(longest) for queue in queues.values() if rank < len(queue)]


def spoken_items(cache: ShardedCache, count: int) -> list[dict]:
    """The first `count` clips of a cache (each once: its media-first item)."""
    found = []
    for item in cache:
        if item_kind(item) == "audio" and item["order"] == IMAGE_FIRST:
            found.append(item)
            if len(found) == count:
                break
    if not found:
        raise ValueError(f"{cache.directory} holds no clips: pass the interleaved validation cache of a run trained "
                         "with speech (preprocess_multimodal_dataset.py --audio_cache_dir)")
    return found


@torch.no_grad()
def measure(args) -> dict:
    device = choose_device(args.device)
    checkpoint = checkpoint_from_args(args, "pretrain_wm.py")
    model, _, codec, tokenizer, meta = load_run(checkpoint, device, vocoder_checkpoint=args.vocoder_checkpoint)
    if codec is None:
        raise ValueError(f"{checkpoint} models no audio: pass a run trained with speech")
    scale = meta["media"]["audio"]["latent_scale_factor"]
    clips = spoken_items(ShardedCache(args.val_data_dir), max(args.clips, args.prompts))
    voices = by_speaker_in_turn(clips)

    truths, heard = [], []
    for item in clips[:args.clips]:
        frames = item["audio_latent_mean"].float().to(device) * scale
        ids = caption_media(model, frames, "audio", condition=item["audio_condition"].float().to(device))
        truths.append(item["caption"])
        heard.append(tokenizer.decode(ids, skip_special_tokens=True))
    train = ShardedCache(meta["train_data_dir"])
    common = Counter(item["caption"] for item in spoken_items(train, len(train))).most_common(1)[0][0]
    recognition = {"world model": wer(truths, heard), f"blind: most common training transcript ({common!r})":
                   wer(truths, [common] * len(truths))}

    output_dir = Path(args.output_dir or checkpoint.parent / "wm_speech_eval")
    for folder in ("tts", "real"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    rows, trim = [], not args.keep_padding
    for index, item in enumerate(voices[:args.prompts]):
        speaker = item["audio_condition"].float().to(device)
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + index)
        frames = text_to_media(model, tokenizer(item["caption"], add_special_tokens=False)["input_ids"], "audio",
                               guidance_scale=args.guidance_scale, steps=args.steps, generator=generator,
                               condition=speaker)
        name = f"{index:03d}-{item['speaker'] or 'unknown'}.wav"
        spoken = codec.waveform(frames, speaker, trim)
        soundfile.write(str(output_dir / "tts" / name), spoken.numpy(), codec.sample_rate)
        real = codec.waveform(item["audio_latent_mean"].float().to(device) * scale, speaker, trim)
        soundfile.write(str(output_dir / "real" / name), real.numpy(), codec.sample_rate)
        rows.append([index, item["speaker"], item["caption"], f"tts/{name}", f"real/{name}"])
    (output_dir / "prompts.tsv").write_text("".join("\t".join(map(str, row)) + "\n" for row in rows))
    return {"checkpoint": str(checkpoint.resolve()), "output_dir": str(output_dir),
            "vocoder": args.vocoder_checkpoint or "Griffin-Lim", "padding": "kept" if args.keep_padding else "cut",
            "recognition": {"clips": len(truths), "wer": recognition,
                            "examples": [[truth, text] for truth, text in zip(truths[:10], heard[:10])]},
            "text_to_speech": {"prompts": len(rows), "guidance_scale": args.guidance_scale, "steps": args.steps}}


def print_report(report: dict, path: Path) -> None:
    output_dir = report["output_dir"]
    print(f"\nrecognition of {report['recognition']['clips']} validation clips ({report['checkpoint']}): "
          "word error rate")
    for name, value in report["recognition"]["wer"].items():
        print(f"  {name:<70} {value:>7.1%}")
    for truth, text in report["recognition"]["examples"]:
        print(f"  {truth}  →  {text}")
    print(f"\ntext to speech: {report['text_to_speech']['prompts']} validation transcripts spoken in their clips' "
          f"voices, vocoded by {report['vocoder']}: {output_dir}/tts, the real clips in {output_dir}/real, "
          f"listed in {output_dir}/prompts.tsv; the figures in {path}")


def main(argv=None) -> int:
    return measure_and_report(build_parser(), measure,
                              lambda args, report: Path(report["output_dir"]) / "wm_speech_eval.json", print_report,
                              argv)


if __name__ == "__main__":
    sys.exit(main())
