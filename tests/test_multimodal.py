"""The multimodal world model: the span mask, the cache, the mode switch of generation, the loss and bad input."""

import pytest
import torch

from model.megatransformer_multimodal import (MegaTransformerMultimodal, MultimodalConfig, is_multimodal_config,
                                              lookup)
from model.multimodal.generation import MediaSegment, TextSegment, generate_multimodal, prompt_tensors
from model.multimodal.loss import capped_noise_levels, multimodal_loss
from model.multimodal.spans import MediaSpans, SpanKVCache
from model.transformer.attention import build_attention_bias

IMAGE = {"latent_channels": 2, "latent_height": 4, "latent_width": 4, "patch_size": 2}  # 4 positions per image
BOS = 1


def tiny_config(**overrides) -> MultimodalConfig:
    values = dict(vocab_size=40, max_position_embeddings=128, hidden_size=32, n_layers=2, n_heads=4, n_query_groups=2,
                  intermediate_size=64, media={"image": dict(IMAGE)}, bos_token_id=BOS, eos_token_id=2,
                  pad_token_id=3, sampling_steps=3)
    values.update(overrides)
    return MultimodalConfig(**values)


def tiny_model(**overrides) -> MegaTransformerMultimodal:
    torch.manual_seed(0)
    model = MegaTransformerMultimodal(tiny_config(**overrides)).eval()
    for decoder in model.media_decoders.values():  # an untrained decoder predicts zeros: make it see its input
        torch.nn.init.normal_(decoder.proj.weight, std=0.5)
    return model


def one_image_batch(model, latents, text_before=(5, 6, 7), text_after=(8, 9, 10)):
    """[bos, text_before, BOI, 4 latent positions, EOI, text_after] with one clean image."""
    return prompt_tensors(model, [TextSegment([BOS, *text_before]), MediaSegment("image", latents),
                                  TextSegment(list(text_after))], torch.device("cpu"))


def allowed_pairs(bias: torch.Tensor) -> torch.Tensor:
    return bias[0, 0] == 0


# ----- the mask -----

def test_span_bias_is_causal_across_and_bidirectional_inside_a_span():
    span_ids = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 2, 0]])
    bias, is_causal = build_attention_bias(None, 9, 9, None, None, torch.float32, torch.device("cpu"), span_ids)
    assert not is_causal
    expected = torch.tensor([[key <= query or (span_ids[0, query] > 0 and span_ids[0, query] == span_ids[0, key])
                              for key in range(9)] for query in range(9)])
    assert torch.equal(allowed_pairs(bias), expected)
    # the last 3 queries against 9 cached keys: the same rows
    bias, _ = build_attention_bias(None, 3, 9, None, None, torch.float32, torch.device("cpu"), span_ids)
    assert torch.equal(bias[0, 0] == 0, expected[6:])
    # no spans: SDPA's own causal mask, as before
    assert build_attention_bias(None, 9, 9, None, None, torch.float32, torch.device("cpu"),
                                torch.zeros(1, 9, dtype=torch.long)) == (None, True)


def test_text_before_an_image_cannot_see_it_and_text_after_sees_all_of_it():
    model = tiny_model()
    latents = torch.randn(1, 2, 4, 4)
    ids, media = one_image_batch(model, latents[0])
    changed = latents.clone()
    changed[..., 0, 0] += 3.0  # one latent pixel: only the first patch
    _, media_changed = one_image_batch(model, changed[0])
    with torch.no_grad():
        out, out_changed = model(ids, media=media), model(ids, media=media_changed)
    start = int(media["image"].starts[0])  # 5: bos, 3 text tokens, BOI
    assert torch.equal(out.logits[0, :start], out_changed.logits[0, :start])  # up to BOI: unaffected
    assert not torch.allclose(out.logits[0, start + 4:], out_changed.logits[0, start + 4:])  # EOI and after
    difference = (out.media["image"] - out_changed.media["image"]).abs()
    per_patch = difference.reshape(2, 2, 2, 2, 2).sum(dim=(0, 2, 4))  # (patch row, patch column)
    assert bool((per_patch > 1e-6).all())


def test_patches_of_one_image_see_each_other():
    """Bidirectional inside the span: the first patch's prediction depends on the last patch (causal would hide it)."""
    model = tiny_model()
    latents = torch.randn(1, 2, 4, 4)
    ids, media = one_image_batch(model, latents[0])
    last_changed = latents.clone()
    last_changed[..., 3, 3] += 3.0
    _, media_changed = one_image_batch(model, last_changed[0])
    with torch.no_grad():
        both = model(ids, media=media).media["image"], model(ids, media=media_changed).media["image"]
    assert not torch.allclose(both[0][..., :2, :2], both[1][..., :2, :2])
    # attention: causal (Transfusion's ablation) hides it
    causal = tiny_model(media={"image": {**IMAGE, "attention": "causal"}})
    with torch.no_grad():
        both = causal(ids, media=media).media["image"], causal(ids, media=media_changed).media["image"]
    assert torch.equal(both[0][..., :2, :2], both[1][..., :2, :2])


# ----- the cache and generation -----

def test_cached_forward_equals_the_full_forward():
    model = tiny_model()
    latents = torch.randn(2, 4, 4)
    ids, media = one_image_batch(model, latents)
    with torch.no_grad():
        full = model(ids, media=media)
        cache = SpanKVCache()
        start = int(media["image"].starts[0])
        pieces = [model(ids[:, :start], past_key_values=cache, use_cache=True).logits]
        span = MediaSpans(latents[None], torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        cached_span = model(ids[:, start:start + 4], media={"image": span}, past_key_values=cache, use_cache=True)
        pieces.append(cached_span.logits)
        for position in range(start + 4, ids.shape[1]):
            pieces.append(model(ids[:, position:position + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_span.media["image"], full.media["image"], atol=1e-5, rtol=1e-5)


def _full_sequence(model, prompt, generated):
    segments = prompt + generated
    if isinstance(prompt[-1], TextSegment) and prompt[-1].token_ids[-1] == model.config.begin_token_id("image"):
        # the prompt opened the span: drop its begin token, prompt_tensors brackets the media segment itself
        segments = prompt[:-1] + [TextSegment(prompt[-1].token_ids[:-1])] + generated
    return prompt_tensors(model, segments, torch.device("cpu"))


def test_mode_switch_samples_the_span_then_closes_it_and_continues_text():
    model = tiny_model()
    config = model.config
    calls = []
    model.media_encoders["image"].register_forward_hook(lambda module, args, out: calls.append(args[1].clone()))
    prompt = [TextSegment([BOS, 5, 6, config.begin_token_id("image")])]
    generated = generate_multimodal(model, prompt, max_new_tokens=6, guidance_scale=2.0, steps=3, eos_token_id=-1,
                                    generator=torch.Generator().manual_seed(0))
    assert isinstance(generated[0], MediaSegment) and generated[0].latents.shape == (2, 4, 4)
    assert isinstance(generated[1], TextSegment)
    # 3 steps x (conditional + unconditional) denoising calls, then the clean latents committed at timestep 0
    assert len(calls) == 7 and float(calls[-1]) == 0.0 and all(float(t) > 0 for t in calls[:-1])
    # cached generation == a full forward over the result: greedy text is the argmax of the full logits
    ids, media = _full_sequence(model, prompt, generated)
    with torch.no_grad():
        logits = model(ids, media=media).logits[0]
    text = generated[1].token_ids
    first_text = ids.shape[1] - len(text)
    assert int(ids[0, first_text - 1]) == config.end_token_id("image")
    predicted = logits[first_text - 1:-1].argmax(-1)
    allowed = logits[first_text - 1:-1].clone()
    allowed[:, config.begin_token_id("image")] = float("-inf")  # max_media=1 forbids a second image
    assert predicted.numel() == len(text) and allowed.argmax(-1).tolist() == text


def test_a_begin_token_emitted_by_the_model_starts_a_span():
    model = tiny_model()
    begin = model.config.begin_token_id("image")
    forced = {"left": 1}

    def favour_begin(module, args, logits):
        if forced["left"] and logits.shape[1] == 1:
            forced["left"] -= 1
            logits = logits.clone()
            logits[..., begin] += 1e4
            return logits
        return None

    prompt = [TextSegment([BOS, 5])]
    model(torch.tensor([[BOS]]))  # warm-up forward (prefill has T > 1 and is left alone by the hook)
    model.lm_head.register_forward_hook(favour_begin)
    generated = generate_multimodal(model, prompt, max_new_tokens=5, guidance_scale=1.0, steps=2, eos_token_id=-1)
    kinds = [type(segment).__name__ for segment in generated]
    # the prefill's last logits (T = 2) are not forced: first a text token, then the forced begin, the image, text
    assert kinds == ["TextSegment", "MediaSegment", "TextSegment"]
    assert begin not in generated[0].token_ids and begin not in generated[2].token_ids


def test_captioning_is_text_after_a_clean_image():
    model = tiny_model()
    prompt = [TextSegment([BOS]), MediaSegment("image", torch.randn(2, 4, 4))]
    generated = generate_multimodal(model, prompt, max_new_tokens=4, eos_token_id=-1, max_media=0)
    assert len(generated) == 1 and isinstance(generated[0], TextSegment) and len(generated[0].token_ids) == 4


# ----- the loss -----

def test_capped_noise_stays_below_its_cap():
    config = tiny_config()
    caps = torch.tensor([1.0, 0.5] * 2000)
    alpha, sigma, timesteps = capped_noise_levels(config, caps, torch.Generator().manual_seed(0))
    assert float(sigma[1::2].max()) <= 0.5 and float(sigma[0::2].max()) > 0.9
    torch.testing.assert_close(alpha + sigma, torch.ones_like(alpha))  # flow matching: x_t = (1 - t) x0 + t noise
    vp = tiny_config(objective="v_prediction", sampler="ddim")
    _, _, steps = capped_noise_levels(vp, caps, torch.Generator().manual_seed(0))
    assert float(steps[1::2].max()) < 500 and float(steps[0::2].max()) > 900


def test_loss_reports_text_and_image_terms_and_learns():
    model = tiny_model()
    model.train()
    ids, media = one_image_batch(model, torch.randn(2, 4, 4))
    labels = ids.clone()
    labels[0, 5:9] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "image_latents": media["image"].latents, "image_rows": media["image"].rows,
             "image_starts": media["image"].starts, "image_noise_cap": torch.ones(1)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(30):
        loss, logs = multimodal_loss(model, model.config, batch, torch.Generator().manual_seed(step % 3))
        assert set(logs) == {"text_loss", "image_loss", "image_noise_level", "aux_loss"}
        torch.testing.assert_close(loss, logs["text_loss"] + 5.0 * logs["image_loss"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((float(logs["text_loss"]), float(logs["image_loss"])))
    assert history[-1][0] < 0.5 * history[0][0]
    assert sum(h[1] for h in history[-3:]) < 0.8 * sum(h[1] for h in history[:3])


# ----- configs and bad input -----

def test_registry_configs_build():
    assert set(lookup) >= {"tiny", "small", "medium", "tiny_recurrent"}
    for name in lookup:
        config = MultimodalConfig.from_name(name)
        assert config.media_kinds == ["image", "audio"] and config.total_vocab_size == config.vocab_size + 4
        assert config.begin_token_id("audio") == config.vocab_size + 2
    recurrent, deep = MultimodalConfig.from_name("tiny_recurrent"), MultimodalConfig.from_name("tiny_deep")
    assert recurrent.backbone == "recurrent" and deep.backbone != "recurrent"
    blocks_at_mean_depth = (recurrent.n_prelude_layers + recurrent.n_coda_layers
                            + recurrent.n_recurrent_layers * recurrent.recurrent_mean_thinking_steps)
    assert deep.n_layers == blocks_at_mean_depth  # the plain stack at the recurrent core's compute
    # tiny_wide is the run of bench/RESULTS.md that was trained as tiny with these overrides
    wide = MultimodalConfig.from_name("tiny").with_overrides(["hidden_size=192", "n_layers=6", "n_heads=6",
                                                              "n_query_groups=2", "intermediate_size=512"])
    assert {**wide.to_dict(), "name": "tiny_wide"} == MultimodalConfig.from_name("tiny_wide").to_dict()
    assert is_multimodal_config("multimodal/tiny") and is_multimodal_config("configs/multimodal/small.yaml")
    assert not is_multimodal_config("tiny") and not is_multimodal_config("configs/causal/tiny.yaml")


def test_image_spans_in_a_text_only_config_are_refused():
    model = tiny_model(media={})
    ids = torch.randint(0, 40, (1, 10))
    spans = MediaSpans(torch.randn(1, 2, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                       torch.tensor([2]))
    with pytest.raises(ValueError, match="models only text"):
        model(ids, media={"image": spans})
    with pytest.raises(ValueError, match="has no 'image' media"):
        model.config.begin_token_id("image")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model(torch.tensor([[BOS, 40]]))


@pytest.mark.parametrize("media, message", [
    ({"video": {}}, "unknown kinds"),
    ({"image": {**IMAGE, "patch_size": 3}}, "must divide"),
    ({"image": {"latent_channels": 2}}, "must be a mapping with the keys"),
    ({"image": {**IMAGE, "attention": "sideways"}}, "must be one of bidirectional, causal"),
])
def test_bad_media_entries_are_refused(media, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(media=media)


def test_latents_of_another_vae_and_spans_outside_the_batch_are_refused():
    model = tiny_model()
    ids = torch.randint(0, 40, (1, 10))
    wrong_shape = MediaSpans(torch.randn(1, 4, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                             torch.tensor([2]))
    with pytest.raises(ValueError, match="another VAE"):
        model(ids, media={"image": wrong_shape})
    outside = MediaSpans(torch.randn(1, 2, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.tensor([8]))
    with pytest.raises(ValueError, match="outside"):
        model(ids, media={"image": outside})
