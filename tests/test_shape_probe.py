"""bench/shape_probe.py: the shape-kind classifier learns what is learnable, the blind row is the majority share,
and a missing VAE is a clear error."""

import json
from collections import Counter

import numpy as np
import torch

from bench import shape_probe
from data.builtin_shapes import SHAPES
from helpers import error_of, run_main
from test_multimodal_pipeline import save_vae


def test_the_classifier_learns_a_separable_kind():
    """Each kind lights its own pixel of a 4-channel 8x8 map: a few hundred steps must get every input right,
    and inputs with the lit pixels swapped between kinds must then be wrong."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(SHAPES), (400,), generator=generator)
    inputs = torch.randn(400, 4, 8, 8, generator=generator) * 0.1
    inputs[torch.arange(400), 0, labels, labels] += 3.0
    correct = shape_probe.train_and_score(inputs[:300], labels[:300], inputs[300:], labels[300:], steps=300, seed=0)
    assert correct.mean() == 1.0
    wrong = shape_probe.train_and_score(inputs[:300], labels[:300], inputs[300:], (labels[300:] + 1) % len(SHAPES),
                                        steps=300, seed=0)
    assert wrong.mean() == 0.0


def test_the_probe_writes_its_rows_and_the_blind_majority(tmp_path):
    vae = save_vae(tmp_path / "vae", seed=0)
    code, out = run_main(shape_probe.main, ["--vae_checkpoint", vae, "--train_images", 40, "--val_images", 30,
                                            "--steps", 3, "--output_dir", tmp_path / "probe"])
    assert code == 0 and "VAE latents" in out
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["latent_shape"] == [4, 8, 8]
    train = [spec.shape for spec in shape_probe.first_specs("train", 40)]
    validation = [spec.shape for spec in shape_probe.first_specs("validation", 30)]
    majority = Counter(train).most_common(1)[0][0]
    blind = report["results"][f"blind: the most common training kind ({majority})"]
    assert blind["all"] == np.mean([shape == majority for shape in validation])
    for row in report["results"].values():
        assert set(row) == {"all", "small", "medium", "large"} and 0.0 <= row["all"] <= 1.0


def test_a_missing_vae_is_a_clear_error(tmp_path, capsys):
    message = error_of(shape_probe.main, ["--vae_checkpoint", tmp_path / "nowhere"], capsys)
    assert "nowhere" in message and "pretrain_image_vae.py" in message
