"""A checkpoint of a multimodal world-model run (pretrain_wm.py) with what reads and writes its media: the model,
its image VAE, its audio ClipCodec and its tokenizer, checked against what the run recorded; shared by
generate_wm.py and the bench scripts that judge a run.

    model, vae, codec, tokenizer, meta = load_run(Path("runs/wm/checkpoint-2000"), device)
    codec.waveform(frames, speaker)          # audio frames -> (S,) waveform; vae decodes image latents

Each checkpoint holds, beside the model, WM_META (the media facts of the run: VAE checkpoints and fingerprints,
latent scale factors, image size, caches) and the tokenizer under TOKENIZER_DIR (training/multimodal_task.py writes
both).
"""

import json
from pathlib import Path

import torch

from data.image_latents import checkpoint_fingerprint
from data.multimodal_audio import ClipCodec
from data.tokenizer import load_tokenizer
from model.image.pipeline import load_vae_checkpoint
from model.pretrained import load_pretrained

WM_META, TOKENIZER_DIR = "wm_meta.json", "tokenizer"


def load_run(checkpoint: Path, device: torch.device, vae_checkpoint=None, audio_vae_checkpoint=None,
             vocoder_checkpoint=None):
    """(model, image VAE or None, ClipCodec or None, tokenizer, wm_meta) of a checkpoint; a VAE with other weights
    than the run's is refused. The checkpoint arguments: where the run's VAEs have moved, and a vocoder (default:
    Griffin-Lim)."""
    meta_path = checkpoint / WM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {WM_META}: pass a checkpoint of pretrain_wm.py with a multimodal "
                                "config (runs/RUN_NAME/checkpoint-STEP)")
    meta = json.loads(meta_path.read_text())
    model = load_pretrained(checkpoint, device, family="multimodal")
    vae = codec = None
    if "image" in model.config.media:
        vae_dir = Path(vae_checkpoint or meta["vae_checkpoint"])
        if not (vae_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"the run's VAE checkpoint {vae_dir} is gone: pass --vae_checkpoint its new place")
        if checkpoint_fingerprint(vae_dir) != meta["vae_fingerprint"]:
            raise ValueError(f"the VAE {vae_dir} is not the one {checkpoint} was trained with "
                             f"({meta['vae_checkpoint']}): pass that checkpoint as --vae_checkpoint")
        vae, _ = load_vae_checkpoint(vae_dir, device=device)
    if "audio" in model.config.media:
        codec = ClipCodec(meta["media"]["audio"], device, audio_vae_checkpoint, vocoder_checkpoint)
    return model, vae, codec, load_tokenizer(str(checkpoint / TOKENIZER_DIR)), meta
