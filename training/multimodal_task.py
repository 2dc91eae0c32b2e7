"""The multimodal world-model task for the shared loop (pretrain_wm.py with a multimodal config): batches from an
interleaved cache (preprocess_multimodal_dataset.py), the Transfusion loss with its text, image and audio terms
logged apart, evaluation on fixed validation items, and samples: captions of fixed validation images and image
grids of fixed prompts; transcripts of fixed validation clips and speech for fixed prompts (TensorBoard's audio
tab, in the voice of a validation clip; vocoded by --vocoder_checkpoint, or Griffin-Lim without one).

A recurrent backbone (backbone: recurrent) trains at the depth sample_num_steps draws for each step (logged as
train/thinking_steps) and is evaluated at its recurrent_mean_thinking_steps (eval/loss and the terms) and at each
depth of --eval_thinking_steps (eval/loss_steps_R); its samples run at the mean depth.

    parser = build_parser(__doc__); add_multimodal_arguments(parser)
    build_task, report = prepare_multimodal(args)          # what training/cli.py's run_training wants

Each micro-batch i draws its caption dropout, posterior latents and noise from generators seeded by
(seed, rank, i): a resumed run sees the same numbers. Each checkpoint holds, beside the model, wm_meta.json (the
VAE checkpoint and the fingerprint of its weights, media (latent scale factors; for audio every encoder: see
data/multimodal_audio.py), the tokenizer's description) and the tokenizer itself, which is all generate_wm.py
needs. A cache, a --vae_checkpoint or a resumed checkpoint made with another VAE, audio VAE, speaker encoder, clip
length or tokenizer stops with a message that says which. Media kinds of the config that the train cache does not
hold are left out of the model (a text + image cache trains a text + image model).
"""

import itertools
import json
import logging
from pathlib import Path

import torch
import yaml

from data.cached_batches import CachedBatches, fixed_items
from data.image_latents import checkpoint_fingerprint
from data.multimodal_audio import ClipCodec
from data.multimodal_batches import IMAGE_FIRST, SequenceLayout, collate_multimodal, item_kind
from data.multimodal_run import TOKENIZER_DIR, WM_META
from data.sharded_cache import ShardedCache
from data.tokenizer import load_tokenizer
from model.megatransformer_multimodal import MultimodalConfig, build_multimodal, resolve_multimodal_config
from model.multimodal.generation import caption_media, text_to_media
from model.multimodal.loss import multimodal_loss
from model.multimodal.media import num_positions
from training.arguments import check_arguments
from training.cli import finished_line
from model.image.pipeline import load_vae_checkpoint
from training.distributed import micro_batch_seed
from training.loop import evaluate_means
from training.task import Audio, Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)

MADE_BY = "preprocess_multimodal_dataset.py"
TRAIN_OPEN_SHARDS = 8
EVAL_SEED, SAMPLE_SEED = 1234, 0
DEFAULT_IMAGE_PROMPTS = ("a large red circle in the center on a white background",
                         "a small blue square in the top left on a yellow background",
                         "a green triangle, medium, at the bottom, on black")
MEDIA_FLAGS = {"VAE": "--vae_checkpoint", "audio VAE": "--audio_vae_checkpoint",
               "speaker encoder": "--speaker_encoder (of preprocess_audio_diffusion_dataset.py)",
               "image latent shape": "--vae_checkpoint", "audio frame shape": "--audio_frames",
               "tokenizer": "--tokenizer"}


def add_multimodal_arguments(parser) -> None:
    group = parser.add_argument_group("multimodal configs (see preprocess_multimodal_dataset.py)")
    group.add_argument("--train_data_dir", default="cached_datasets/wm_train", help="interleaved cache, train split")
    group.add_argument("--val_data_dir", default="cached_datasets/wm_val", help="interleaved cache, validation split")
    group.add_argument("--vae_checkpoint", help="the image VAE that decodes samples (default: the caches'; another "
                                                "one is refused)")
    group.add_argument("--sample_image_prompts", nargs="+", help="prompts of the image grids")
    group.add_argument("--sample_guidance_scales", type=float, nargs="+", default=[1.0, 3.0],
                       help="one grid row per guidance scale")
    group.add_argument("--sample_steps", type=int, help="sampling steps (default: the config's sampling_steps)")
    group.add_argument("--sample_captions", type=int, default=4, help="validation images captioned per sample round")
    group.add_argument("--sample_speech_prompts", nargs="+", help="texts spoken in the audio samples (default: the "
                                                                  "transcripts of the first validation clips)")
    group.add_argument("--sample_transcripts", type=int, default=4, help="validation clips transcribed per round")
    group.add_argument("--audio_vae_checkpoint", help="the audio VAE that decodes speech samples (default: the "
                                                      "caches'; another one is refused)")
    group.add_argument("--vocoder_checkpoint", help="a pretrain_vocoder.py checkpoint for the speech samples "
                                                    "(default: Griffin-Lim)")


# ----- caches, VAE and config -----

def identities(meta: dict) -> dict:
    """What must agree between caches and runs: the VAE weights, the audio side's encoders and clip length, the
    latent shapes and the tokenizer's vocabulary (None where a cache has no such media)."""
    image, audio = meta["media"].get("image") or {}, meta["media"].get("audio") or {}
    return {"VAE": meta.get("vae_fingerprint"), "audio VAE": audio.get("vae_fingerprint"),
            "speaker encoder": (audio.get("speaker_encoder") or {}).get("name"),
            "image latent shape": image.get("latent_shape"), "audio frame shape": audio.get("latent_shape"),
            "tokenizer": meta["tokenizer"]["fingerprint"]}


def open_multimodal_caches(train_dir, val_dir) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation caches, checked to be interleaved caches of the same VAE and tokenizer."""
    train = ShardedCache(train_dir, made_by=f"{MADE_BY} --split train", open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    for cache in (train, val):
        if cache.meta.get("made_by") != MADE_BY:
            raise ValueError(f"{cache.directory} is not an interleaved cache (made by "
                             f"{cache.meta.get('made_by', 'an unknown script')}): write it with {MADE_BY}")
    train_ids, val_ids = identities(train.meta), identities(val.meta)
    for key, flag in MEDIA_FLAGS.items():
        if train_ids[key] != val_ids[key]:
            raise ValueError(f"the train cache {train.directory} and the validation cache {val.directory} were made "
                             f"with another {key} (fingerprints {train_ids[key]} vs {val_ids[key]}): write both "
                             f"with the same {MADE_BY} {flag}")
    return train, val


def load_cache_vae(cache: ShardedCache, vae_checkpoint: str | None, device: torch.device):
    """The VAE that made the cache's latents: --vae_checkpoint if given (refused when its weights differ from
    the cache's), else the checkpoint the cache records."""
    directory = vae_checkpoint or cache.meta["vae_checkpoint"]
    if not Path(directory, "model.safetensors").is_file():
        raise FileNotFoundError(f"the VAE checkpoint {directory} of {cache.directory} is gone: pass --vae_checkpoint "
                                "the same checkpoint at its new place")
    if checkpoint_fingerprint(directory) != cache.meta["vae_fingerprint"]:
        raise ValueError(f"the VAE checkpoint {directory} is not the one {cache.directory} was made with "
                         f"({cache.meta['vae_checkpoint']}): its latents would decode wrongly; pass that "
                         f"checkpoint, or re-run {MADE_BY} with this one")
    vae, _ = load_vae_checkpoint(directory, device=device)
    return vae, directory


def resolve_config(name: str, overrides: list[str], cache: ShardedCache) -> MultimodalConfig:
    """The named multimodal config with the cache's vocabulary, special tokens, latent grids and clip shape (and
    only the media kinds the cache holds), then --set.

    `--set "media={image: {patch_size: 4, attention: causal}}"` changes the named keys of a media entry and keeps
    the rest (the latent grid, the audio frames and the speaker width always come from the cache)."""
    base = resolve_multimodal_config(name)
    media = {kind: dict(entry) for kind, entry in base.media.items()}
    others = []
    for assignment in overrides:
        key, _, text = assignment.partition("=")
        if key.strip() != "media":
            others.append(assignment)
            continue
        given = yaml.safe_load(text)
        if not isinstance(given, dict) or not all(isinstance(entry, dict) for entry in given.values()):
            raise ValueError(f"--set {assignment}: media must map each kind to a mapping of its keys, e.g. "
                             "media={image: {patch_size: 2}}")
        for kind, entry in given.items():
            media[kind] = {**media.get(kind, {}), **entry}
    for kind, recorded in cache.meta["media"].items():
        if kind not in media:
            raise ValueError(f"the cache {cache.directory} holds '{kind}' spans but config '{base.name}' models "
                             f"{', '.join(['text'] + base.media_kinds)}: use a config with '{kind}' in its media")
        if kind == "image":
            channels, height, width = recorded["latent_shape"]
            media[kind].update(latent_channels=channels, latent_height=height, latent_width=width)
        else:
            channels, frames = recorded["latent_shape"]
            media[kind].update(channels=channels, frames=frames,
                               speaker_embedding_dim=recorded["speaker_embedding_dim"])
    left_out = [kind for kind in media if kind not in cache.meta["media"]]
    if left_out:
        logger.info("config '%s' leaves out %s: the cache %s holds none", base.name, ", ".join(left_out),
                    cache.directory)
    media = {kind: entry for kind, entry in media.items() if kind in cache.meta["media"]}
    tokenizer = cache.meta["tokenizer"]
    values = {**base.to_dict(), "media": media, "vocab_size": tokenizer["vocab_size"],
              "bos_token_id": tokenizer["bos_token_id"], "eos_token_id": tokenizer["eos_token_id"],
              "pad_token_id": tokenizer["pad_token_id"]}
    try:
        config = MultimodalConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{error} (with the latent grid and vocabulary of {cache.directory})") from None
    return config.with_overrides(others)


class WMState:
    """The loop's extra_state: writes wm_meta.json and the tokenizer into each checkpoint, and refuses to resume
    a checkpoint made with another VAE, audio encoders or tokenizer."""

    def __init__(self, meta: dict, tokenizer):
        self.meta, self.tokenizer = meta, tokenizer

    def save(self, directory: Path) -> None:
        (Path(directory) / WM_META).write_text(json.dumps(self.meta, indent=2) + "\n")
        self.tokenizer.save_pretrained(Path(directory) / TOKENIZER_DIR)

    def load(self, directory: Path) -> None:
        path = Path(directory) / WM_META
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {WM_META}: resume from a checkpoint of pretrain_wm.py with a "
                                    "multimodal config")
        recorded, current = identities(json.loads(path.read_text())), identities(self.meta)
        for key in current:
            if recorded[key] != current[key]:
                raise ValueError(f"{directory} was trained on a cache made with another {key} (fingerprints "
                                 f"{recorded[key]} vs {current[key]} in {self.meta['train_data_dir']}): resume with "
                                 "the caches it was trained on")


# ----- the task -----

def _image_samples(eval_model, vae, tokenizer, caption_items, prompt_ids, scale, args, device) -> dict:
    """Captions of fixed validation images and one image grid (rows: guidance scales, columns: prompts)."""
    lines = []
    for item in caption_items:
        latents = item["image_latent_mean"].float().to(device) * scale
        generated = tokenizer.decode(caption_media(eval_model, latents), skip_special_tokens=True)
        lines.append(f"**{item['caption']}** → {generated}")
    rows = []
    for guidance_scale in args.sample_guidance_scales:
        images = []
        for ids in prompt_ids:
            generator = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
            latents = text_to_media(eval_model, ids, guidance_scale=guidance_scale, steps=args.sample_steps,
                                    generator=generator)
            images.append(vae.decode(latents[None] / scale).float().clamp(-1, 1)[0])
        rows.append(torch.cat(images, dim=-1))
    layout_text = (f"rows: guidance scales {', '.join(f'{s:g}' for s in args.sample_guidance_scales)}; "
                   "columns: " + " | ".join(args.sample_image_prompts))
    return {"samples/captions": "\n\n".join(lines), "samples/images": Image(((torch.cat(rows, -2) + 1) / 2).cpu()),
            "samples/layout": layout_text}


def _audio_samples(eval_model, codec: ClipCodec, tokenizer, transcribed, voices, speech_prompts, args,
                   device) -> dict:
    """Transcripts of the validation clips `transcribed`, and each speech prompt spoken in the voice of one of the
    validation clips `voices` (at the largest of --sample_guidance_scales). Nothing without validation clips."""
    if not voices:
        return {}
    scale = codec.meta["latent_scale_factor"]
    lines = []
    for item in transcribed:
        frames = item["audio_latent_mean"].float().to(device) * scale
        heard = caption_media(eval_model, frames, "audio", condition=item["audio_condition"].to(device))
        lines.append(f"**{item['caption']}** → {tokenizer.decode(heard, skip_special_tokens=True)}")
    logged = {"samples/transcripts": "\n\n".join(lines)}
    for index, prompt in enumerate(speech_prompts):
        speaker = voices[index % len(voices)]["audio_condition"].to(device)
        generator = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        frames = text_to_media(eval_model, tokenizer(prompt, add_special_tokens=False)["input_ids"], "audio",
                               guidance_scale=max(args.sample_guidance_scales), steps=args.sample_steps,
                               generator=generator, condition=speaker)
        logged[f"samples/speech_{index}"] = Audio(codec.waveform(frames, speaker), codec.sample_rate)
    logged["samples/speech_prompts"] = "\n\n".join(f"speech_{index}: {prompt}"
                                                    for index, prompt in enumerate(speech_prompts))
    return logged


def build_multimodal_task(model, config: MultimodalConfig, train_cache: ShardedCache, val_cache: ShardedCache,
                          vae, clip_codec, tokenizer, args, context) -> TrainingTask:
    """The TrainingTask. vae: the image VAE (None without images); clip_codec: a ClipCodec (None without
    audio). args: batch_size, seed, eval_batches, eval_steps, eval_thinking_steps, vae_checkpoint (resolved),
    sample_image_prompts, sample_guidance_scales, sample_steps, sample_captions, sample_speech_prompts,
    sample_transcripts."""
    device = context.device
    scales = {kind: float(meta["latent_scale_factor"]) for kind, meta in train_cache.meta["media"].items()}
    layout = SequenceLayout.from_config(config, {kind: model.span_length(kind) for kind in config.media_kinds})
    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, list)
    recurrent = config.backbone == "recurrent"

    def collate(items: list, seed: int, caption_dropout: float) -> dict:
        return collate_multimodal(items, layout, scales, caption_dropout, config.caption_noise_cap,
                                  torch.Generator().manual_seed(seed))

    def first_media_first(kind: str, count: int) -> list:
        return list(itertools.islice((item for item in val_cache if item_kind(item) == kind and
                                      item["order"] == IMAGE_FIRST), count))

    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    val = [{**collate(val_items[start:start + args.batch_size], EVAL_SEED + start, 0.0), "index": torch.tensor(start)}
           for start in range(0, len(val_items), args.batch_size)]
    caption_items = first_media_first("image", args.sample_captions) if vae is not None else []
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in args.sample_image_prompts]
    clips = first_media_first("audio", max(args.sample_transcripts, 2)) if clip_codec is not None else []
    speech_prompts = args.sample_speech_prompts or [item["caption"] for item in clips[:2]]
    meta = train_cache.meta
    state = WMState({"made_by": "pretrain_wm.py",
                     "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()) if vae is not None else None,
                     "vae_fingerprint": meta["vae_fingerprint"], "vae_config": meta["vae_config"],
                     "media": meta["media"], "image_size": meta["image_size"], "tokenizer": meta["tokenizer"],
                     "train_data_dir": str(Path(train_cache.directory).resolve())}, tokenizer)
    if context.rank == 0:
        tokenizer.save_pretrained(context.run_dir / TOKENIZER_DIR)

    def train_batch(i: int) -> dict:
        seed = micro_batch_seed(args.seed, context.rank, i)
        return {**collate(train.batch(i), seed, config.caption_dropout), "index": torch.tensor(i)}

    def loss(forward, batch: dict, step: int) -> LossTerms:
        seed = micro_batch_seed(args.seed + 1, context.rank, int(batch["index"]))
        num_steps = model.sample_num_steps(step, context.rank) if recurrent else None
        value, logs = multimodal_loss(forward, config, batch, torch.Generator(device=device).manual_seed(seed),
                                      num_steps)
        return LossTerms(value, logs={**logs, "thinking_steps": num_steps} if recurrent else logs)

    def measure_at(num_steps):
        def measure(eval_model, batch: dict) -> dict:
            generator = torch.Generator(device=device).manual_seed(EVAL_SEED + 1_000_003 + int(batch["index"]))
            value, logs = multimodal_loss(eval_model, config, batch, generator, num_steps)
            terms = {name: logs[name] for name in logs if name.endswith("_loss") and name != "aux_loss"}
            return {"loss": value, **terms}
        return measure

    def evaluate(eval_model) -> dict:
        mean_depth = config.recurrent_mean_thinking_steps if recurrent else None
        metrics = {f"eval/{name}": value for name, value in
                   evaluate_means(eval_model, val, measure_at(mean_depth), device).items()}
        for depth in (args.eval_thinking_steps if recurrent else ()):
            metrics[f"eval/loss_steps_{depth}"] = evaluate_means(eval_model, val, measure_at(depth), device)["loss"]
        return metrics

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        logged = {}
        if vae is not None:
            logged.update(_image_samples(eval_model, vae, tokenizer, caption_items, prompt_ids, scales["image"], args,
                                         device))
        if clip_codec is not None:
            logged.update(_audio_samples(eval_model, clip_codec, tokenizer, clips[:args.sample_transcripts], clips,
                                         speech_prompts, args, device))
        eval_model.train(was_training)
        return logged

    logger.info("multimodal: %d train items (%d batches per epoch per rank), %d validation items", len(train_cache),
                train.batches_per_epoch, len(val_items))
    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: int(batch["attention_mask"].sum()), throughput_unit="tokens",
                        evaluate=evaluate, samples=samples, generation_steps=args.generation_steps or args.eval_steps,
                        extra_state=state)


def prepare_multimodal(args):
    """pretrain_wm.py's prepare() for a multimodal config: (build_task(context), report(summary))."""
    args.sample_image_prompts = args.sample_image_prompts or list(DEFAULT_IMAGE_PROMPTS)
    check_arguments(args)
    if args.sample_steps is not None and args.sample_steps < 1:
        raise ValueError(f"--sample_steps must be at least 1, got {args.sample_steps}")
    if args.sample_transcripts < 0:
        raise ValueError(f"--sample_transcripts must not be negative, got {args.sample_transcripts}")
    if min(args.eval_thinking_steps) < 1:
        raise ValueError(f"--eval_thinking_steps must be at least 1, got {min(args.eval_thinking_steps)}")
    train_cache, val_cache = open_multimodal_caches(args.train_data_dir, args.val_data_dir)
    config = resolve_config(args.config, args.set, train_cache)
    longest = 4 + train_cache.meta["longest_caption_tokens"] + max(
        [num_positions(kind, config.media[kind]) for kind in config.media_kinds] or [0])
    longest = max(longest, train_cache.meta["text_tokens"] or 0)
    if longest > config.max_position_embeddings:
        raise ValueError(f"the longest sequence of {train_cache.directory} has {longest} positions, more than "
                         f"max_position_embeddings={config.max_position_embeddings} of config '{config.name}': "
                         "--set a larger max_position_embeddings, or write the cache with a smaller "
                         "--max_caption_tokens (or shorter --audio_frames)")
    tokenizer = load_tokenizer(str(Path(train_cache.directory, train_cache.meta["tokenizer"]["directory"])))

    def build_task(context):
        vae = clip_codec = None
        if "image" in config.media:
            vae, args.vae_checkpoint = load_cache_vae(train_cache, args.vae_checkpoint, context.device)
        if "audio" in config.media:
            clip_codec = ClipCodec(train_cache.meta["media"]["audio"], context.device, args.audio_vae_checkpoint,
                                       args.vocoder_checkpoint)
        return build_multimodal_task(build_multimodal(config), config, train_cache, val_cache, vae, clip_codec,
                                     tokenizer, args, context)

    def report(summary: dict) -> str:
        lines = [finished_line(summary, f"{summary['tokens']:,} tokens")]
        if "eval/loss" in summary:
            lines.append("validation: " + ", ".join(f"{key.removeprefix('eval/')} {value:.4f}"
                                                    for key, value in summary.items() if key.startswith("eval/")))
        if summary.get("samples/captions"):
            lines.append(f"\ncaptions of validation images (true → generated):\n{summary['samples/captions']}")
        if summary.get("samples/transcripts"):
            lines.append(f"\ntranscripts of validation clips (true → heard):\n{summary['samples/transcripts']}")
        return "\n".join(lines)

    return build_task, report
