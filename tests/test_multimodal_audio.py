"""The world model with audio spans and the recurrent core: the audio span's mask and speaker conditioning, the
cache and the mode switch with text, image and audio in one sequence, the recurrent backbone, and bad input."""

import pytest
import torch

from model.megatransformer_multimodal import MegaTransformerMultimodal, MultimodalConfig
from model.multimodal.generation import MediaSegment, TextSegment, generate_multimodal, prompt_tensors
from model.multimodal.loss import multimodal_loss
from model.multimodal.spans import MediaSpans, SpanKVCache

IMAGE = {"latent_channels": 2, "latent_height": 4, "latent_width": 4, "patch_size": 2}  # 4 positions
AUDIO = {"channels": 3, "frames": 6, "patch_frames": 2, "speaker_embedding_dim": 5}  # 3 positions
BOS, EOS = 1, 2


def tiny_model(backbone: str = "causal", **audio) -> MegaTransformerMultimodal:
    torch.manual_seed(0)
    recurrent = dict(n_prelude_layers=1, n_recurrent_layers=1, n_coda_layers=1, recurrent_mean_thinking_steps=3,
                     recurrent_backprop_depth=2, recurrent_init_state="zero") if backbone == "recurrent" else {}
    config = MultimodalConfig(vocab_size=40, max_position_embeddings=128, hidden_size=32, n_layers=2, n_heads=4,
                              n_query_groups=2, intermediate_size=64, media={"image": dict(IMAGE),
                                                                             "audio": {**AUDIO, **audio}},
                              bos_token_id=BOS, eos_token_id=EOS, pad_token_id=3, sampling_steps=3,
                              backbone=backbone, **recurrent)
    model = MegaTransformerMultimodal(config).eval()
    for decoder in model.media_decoders.values():  # an untrained decoder predicts zeros: make it see its input
        torch.nn.init.normal_(decoder.proj.weight, std=0.5)
    return model


def three_modalities(model, clip, speaker, image=None):
    """[bos 5 6] [audio span] [7 8] [image span] [9] with clean media."""
    image = torch.ones(2, 4, 4) if image is None else image
    return prompt_tensors(model, [TextSegment([BOS, 5, 6]), MediaSegment("audio", clip, speaker), TextSegment([7, 8]),
                                  MediaSegment("image", image), TextSegment([9])], torch.device("cpu"))


def test_audio_spans_are_bidirectional_by_config_and_causal_for_streaming():
    clip, speaker = torch.randn(3, 6), torch.randn(5)
    changed = clip.clone()
    changed[:, -1] += 3.0  # the last frame: only the last position
    for attention, first_sees_last in (("bidirectional", True), ("causal", False)):
        model = tiny_model(attention=attention)
        ids, media = three_modalities(model, clip, speaker)
        _, media_changed = three_modalities(model, changed, speaker)
        with torch.no_grad():
            out, out_changed = model(ids, media=media), model(ids, media=media_changed)
        start = int(media["audio"].starts[0])
        assert torch.equal(out.logits[0, :start], out_changed.logits[0, :start])  # text before the clip
        assert not torch.allclose(out.logits[0, start + 3:], out_changed.logits[0, start + 3:])  # after it
        first = out.media["audio"][..., :2], out_changed.media["audio"][..., :2]
        assert torch.equal(*first) != first_sees_last
        assert out.media["audio"].shape == (1, 3, 6) and out.media["image"].shape == (1, 2, 4, 4)


def test_the_speaker_embedding_conditions_its_span():
    model = tiny_model()
    clip = torch.randn(3, 6)
    ids, media = three_modalities(model, clip, torch.randn(5))
    _, other = three_modalities(model, clip, torch.randn(5))
    with torch.no_grad():
        out, out_other = model(ids, media=media), model(ids, media=other)
    start = int(media["audio"].starts[0])
    assert not torch.allclose(out.media["audio"], out_other.media["audio"])
    assert torch.equal(out.logits[0, :start], out_other.logits[0, :start])
    with pytest.raises(ValueError, match="need their speaker embeddings"):
        model(ids, media={**media, "audio": MediaSpans(media["audio"].latents, media["audio"].timesteps,
                                                        media["audio"].rows, media["audio"].starts)})
    unconditioned = tiny_model(speaker_embedding_dim=0)
    with pytest.raises(ValueError, match="take no conditioning vector"):
        unconditioned(ids, media=media)
    with pytest.raises(ValueError, match="some 'audio' spans of the prompt"):
        prompt_tensors(model, [TextSegment([BOS]), MediaSegment("audio", clip, torch.randn(5)),
                               MediaSegment("audio", clip)], torch.device("cpu"))


@pytest.mark.parametrize("backbone", ["causal", "recurrent"])
def test_cached_forward_equals_the_full_forward_with_three_modalities(backbone):
    model = tiny_model(backbone)
    depth = {"num_steps": 2} if backbone == "recurrent" else {}
    ids, media = three_modalities(model, torch.randn(3, 6), torch.randn(5), torch.randn(2, 4, 4))
    with torch.no_grad():
        full = model(ids, media=media, **depth)
        cache, pieces, position = SpanKVCache(), [], 0
        spans = sorted((int(span.starts[0]), kind, span) for kind, span in media.items())
        for start, kind, span in spans:
            pieces.append(model(ids[:, position:start], past_key_values=cache, use_cache=True, **depth).logits)
            n = model.span_length(kind)
            local = MediaSpans(span.latents, span.timesteps, span.rows, torch.zeros(1, dtype=torch.long),
                               span.condition)
            out = model(ids[:, start:start + n], media={kind: local}, past_key_values=cache, use_cache=True, **depth)
            pieces.append(out.logits)
            torch.testing.assert_close(out.media[kind], full.media[kind], atol=1e-5, rtol=1e-5)
            position = start + n
        for index in range(position, ids.shape[1]):
            pieces.append(model(ids[:, index:index + 1], past_key_values=cache, use_cache=True, **depth).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["causal", "recurrent"])
def test_text_to_speech_then_text_after_the_clip(backbone):
    """The mode switch at begin-of-audio: the clip is sampled in the given voice, committed, closed; text follows."""
    model = tiny_model(backbone)
    config = model.config
    speaker = torch.randn(5)
    seen = []
    model.media_encoders["audio"].register_forward_hook(lambda module, args, out: seen.append(args[2].clone()))
    prompt = [TextSegment([BOS, 5, 6, config.begin_token_id("audio")])]
    generated = generate_multimodal(model, prompt, max_new_tokens=4, guidance_scale=2.0, steps=2, eos_token_id=-1,
                                    generator=torch.Generator().manual_seed(0), conditions={"audio": speaker})
    assert isinstance(generated[0], MediaSegment) and generated[0].latents.shape == (3, 6)
    assert generated[0].kind == "audio" and torch.equal(generated[0].condition, speaker)
    assert isinstance(generated[1], TextSegment) and len(generated[1].token_ids) == 3
    # 2 steps x (conditional + unconditional), then the commit: every call carried the speaker
    assert len(seen) == 5 and all(torch.equal(condition[0], speaker) for condition in seen)
    # the cached result equals a full forward over it: greedy text is the argmax of the full logits
    ids, media = prompt_tensors(model, [TextSegment([BOS, 5, 6]), *generated], torch.device("cpu"))
    with torch.no_grad():
        logits = model(ids, media=media, **({"num_steps": 3} if backbone == "recurrent" else {})).logits[0]
    logits[:, [config.begin_token_id(kind) for kind in config.media_kinds]] = float("-inf")  # max_media=1
    assert logits[-4:-1].argmax(-1).tolist() == generated[1].token_ids


def test_recognition_is_text_after_a_clean_clip():
    model = tiny_model()
    prompt = [TextSegment([BOS]), MediaSegment("audio", torch.randn(3, 6), torch.randn(5))]
    generated = generate_multimodal(model, prompt, max_new_tokens=4, eos_token_id=-1, max_media=0)
    assert len(generated) == 1 and isinstance(generated[0], TextSegment) and len(generated[0].token_ids) == 4


def test_loss_logs_audio_apart_and_the_recurrent_core_learns_at_a_sampled_depth():
    model = tiny_model("recurrent").train()
    ids, media = three_modalities(model, torch.randn(3, 6), torch.randn(5), torch.randn(2, 4, 4))
    labels = ids.clone()
    for span in media.values():
        labels[0, int(span.starts[0]):int(span.starts[0]) + 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for kind, span in media.items():
        batch.update({f"{kind}_latents": span.latents, f"{kind}_rows": span.rows, f"{kind}_starts": span.starts,
                      f"{kind}_noise_cap": torch.ones(1)})
    batch["audio_conditions"] = media["audio"].condition
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for step in range(40):
        depth = model.sample_num_steps(step)
        loss, logs = multimodal_loss(model, model.config, batch, torch.Generator().manual_seed(step % 3), depth)
        assert {"text_loss", "image_loss", "audio_loss", "audio_noise_level"} <= set(logs)
        torch.testing.assert_close(loss, logs["text_loss"] + 5.0 * (logs["image_loss"] + logs["audio_loss"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((float(logs["text_loss"]), float(logs["audio_loss"])))
    assert history[-1][0] < 0.5 * history[0][0]
    assert sum(h[1] for h in history[-3:]) < 0.8 * sum(h[1] for h in history[:3])
    # evaluation at fixed depths: the depth changes the output, and the same depth repeats it exactly
    model.eval()
    with torch.no_grad():
        one, two, two_again = (model(ids, media=media, num_steps=r).logits for r in (1, 2, 2))
    assert not torch.allclose(one, two) and torch.equal(two, two_again)


def test_the_backbone_switch():
    causal, recurrent = tiny_model(), tiny_model("recurrent")
    assert hasattr(causal, "blocks") and not hasattr(causal, "core")
    assert len(recurrent.core) == 1 and not hasattr(recurrent, "blocks")
    ids = torch.tensor([[BOS, 5, 6]])
    with pytest.raises(ValueError, match="needs a recurrent backbone"):
        causal(ids, num_steps=2)
    with pytest.raises(ValueError, match="needs a recurrent backbone"):
        generate_multimodal(causal, [TextSegment([BOS])], max_new_tokens=1, num_steps=2)
    with pytest.raises(ValueError, match="config key 'backbone'"):
        MultimodalConfig(hidden_size=32, n_heads=4, backbone="sideways")


@pytest.mark.parametrize("audio, message", [
    ({**AUDIO, "patch_frames": 4}, "must divide"),
    ({"channels": 3, "frames": 6}, "must be a mapping with the keys"),
    ({**AUDIO, "attention": "sideways"}, "must be one of bidirectional, causal"),
    ({**AUDIO, "speaker_embedding_dim": -1}, "non-negative integer"),
    ({**AUDIO, "frames": 0}, "positive integer"),
])
def test_bad_audio_entries_are_refused(audio, message):
    with pytest.raises(ValueError, match=message):
        MultimodalConfig(hidden_size=32, n_heads=4, media={"audio": audio})


def test_frames_of_another_clip_length_are_refused():
    model = tiny_model()
    spans = MediaSpans(torch.randn(1, 3, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.tensor([1]),
                       torch.randn(1, 5))
    with pytest.raises(ValueError, match="another audio VAE or clip length"):
        model(torch.randint(4, 40, (1, 8)), media={"audio": spans})
