"""The shapes judges (training/shape_judges.py) of bench/caption_fidelity.py and bench/wm_shapes_eval.py: the colour
classifier against builtin:shapes' own drawings (whose colours are known from their specs), the prompt selection and
scoring; and caption_fidelity's clear errors for bad flags."""

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image

from bench import caption_fidelity
from data.builtin_shapes import PALETTE, draw_shape, shape_specs
from model.image.pipeline import slug
from training.shape_judges import (COLOR_NAMES, ImageColors, blended_palette_color, classify_colors,
                                   nearest_palette_color, prompt_specs, score)

SPECS = [spec for _, spec in itertools.islice(shape_specs("train"), 300)]


@pytest.mark.parametrize("image_size", [32, 64])
def test_drawn_shapes_get_their_spec_colours(image_size):
    for spec in SPECS:
        found = classify_colors(draw_shape(spec, image_size))
        assert (found.shape, found.background) == (spec.color, spec.background), spec
        assert found.shape_pixels > 0


def test_every_colour_pair_is_told_apart_for_the_smallest_shapes():
    """The hardest cases: the smallest star (few pixels) at 32x32, every shape colour on every background."""
    star = next(spec for spec in SPECS if spec.shape == "star")
    star = dataclasses.replace(star, size="small", diameter=0.15)
    for color, background in itertools.permutations(PALETTE, 2):
        found = classify_colors(draw_shape(dataclasses.replace(star, color=color, background=background), 32))
        assert (found.shape, found.background) == (color, background)


def test_noisy_images_keep_their_colours():
    """Generated images are noisy: Gaussian noise (std 12 of 255) does not change the answer."""
    rng = np.random.default_rng(0)
    for spec in SPECS[:100]:
        pixels = np.asarray(draw_shape(spec, 32)).astype(np.float64) + rng.normal(0, 12, (32, 32, 3))
        found = classify_colors(pixels.clip(0, 255).round().astype(np.uint8))
        assert (found.shape, found.background) == (spec.color, spec.background), spec


def test_a_shape_in_another_colour_does_not_match_its_prompt():
    spec = SPECS[0]
    other = next(name for name in PALETTE if name not in (spec.color, spec.background))
    found = classify_colors(draw_shape(dataclasses.replace(spec, color=other), 32))
    assert found.shape == other
    assert score([found], [spec])["shape_color"] == 0.0
    assert score([classify_colors(draw_shape(spec, 32))], [spec])["shape_color"] == 1.0


def test_a_uniform_image_has_no_shape():
    for name, rgb in PALETTE.items():
        found = classify_colors(Image.new("RGB", (32, 32), rgb))
        assert found == ImageColors(None, name, None, tuple(map(float, rgb)), 0)
    faint = np.full((32, 32, 3), 128, dtype=np.uint8)
    faint[10:20, 10:20] = 140  # a faint blob, closer to the background than any two palette colours are
    assert classify_colors(faint).shape is None
    assert score([classify_colors(faint)], [SPECS[0]])["no_shape"] == 1.0


def test_nearest_palette_color():
    for name, (r, g, b) in PALETTE.items():
        assert nearest_palette_color((r, g, b)) == name
        assert nearest_palette_color((min(r + 15, 255), max(g - 15, 0), b)) == name
    with pytest.raises(ValueError, match="3 values"):
        nearest_palette_color((1, 2))


def test_blends_with_the_background_keep_the_shape_colour():
    """A partly covered pixel, a * shape + (1 - a) * background, names the shape's colour, not the nearest one
    (yellow blended 70% on black is nearer orange); below a = 0.6 white on black is gray (ambiguous by nature)."""
    assert nearest_palette_color(np.array(PALETTE["yellow"]) * 0.7 + np.array(PALETTE["black"]) * 0.3) == "orange"
    for color, background in itertools.permutations(PALETTE, 2):
        for amount in (0.6, 0.8, 1.0):
            rgb = amount * np.array(PALETTE[color]) + (1 - amount) * np.array(PALETTE[background])
            assert blended_palette_color(rgb, PALETTE[background]) == color, (color, background, amount)
    white_at_half = (np.array(PALETTE["white"]) + PALETTE["black"]) / 2
    assert blended_palette_color(white_at_half, PALETTE["black"]) == "gray"


@pytest.mark.parametrize("shape", [(32, 32), (3, 32, 32), (2, 2, 3), (32, 32, 4)])
def test_bad_images_are_refused(shape):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        classify_colors(np.zeros(shape, dtype=np.uint8))


def test_score_counts_hits_per_colour_and_confusions():
    red, blue = (dataclasses.replace(SPECS[0], color=color, background="white") for color in ("red", "blue"))
    found = [ImageColors("red", "white", None, (0, 0, 0), 1), ImageColors("purple", "gray", None, (0, 0, 0), 1),
             ImageColors(None, "white", None, (0, 0, 0), 0), ImageColors("blue", "white", None, (0, 0, 0), 1)]
    result = score(found, [red, red, blue, blue])
    assert result["shape_color"] == 0.5 and result["background_color"] == 0.75 and result["no_shape"] == 0.25
    assert result["per_color"] == {"red": 0.5, "blue": 0.5}
    assert result["confusion"] == {"red": {"red": 1, "purple": 1}, "blue": {"none": 1, "blue": 1}}
    with pytest.raises(ValueError, match="one spec per image"):
        score(found, [red])


def test_prompts_are_balanced_validation_captions_in_the_training_style():
    specs = prompt_specs(3)
    assert [spec.color for spec in specs] == [name for name in COLOR_NAMES for _ in range(3)]
    validation = {spec for _, spec in itertools.islice(shape_specs("validation"), 2000)}
    assert set(specs) <= validation
    assert len({slug(spec.caption) for spec in specs}) == len(specs)
    for spec in specs:
        assert spec.color in spec.caption.replace(",", "").split()
    with pytest.raises(ValueError, match="specs_per_color"):
        prompt_specs(0)



@pytest.mark.parametrize("flags, message", [
    (["--num_images", "0"], "--num_images must be at least 1"),
    (["--guidance_scales", "1", "-2"], "--guidance_scales must not be negative"),
    (["--steps", "0"], "--steps must be at least 1"),
    ([], "does not exist: train one with pretrain_image_diffusion.py"),
])
def test_bad_flags_stop_with_a_message(tmp_path, capsys, flags, message):
    assert caption_fidelity.main(["--run_dir", str(tmp_path / "missing"), *flags]) == 1
    assert message in capsys.readouterr().err
