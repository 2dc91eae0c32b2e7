"""The language-modelling task for the shared loop: packed token windows from a text cache, next-token
loss, validation loss/perplexity, and text samples from fixed prompts."""

import math

import torch

from data.text_cache import PackedBatches, TextTokenCache, evaluation_batches
from model.generation import left_pad
from training.loop import TrainingTask, evaluate_mean_loss

DEFAULT_PROMPTS = ("The", "In the beginning", "def main():", "The function returns")


def lm_loss(model, batch: dict) -> torch.Tensor:
    """batch["input_ids"]: (B, T) → mean next-token cross-entropy (+ MoE auxiliary terms)."""
    return model(batch["input_ids"], labels=batch["input_ids"]).loss


def _sample_texts(model, tokenizer, prompts, max_new_tokens: int, device: torch.device) -> dict:
    """Sampled continuations (temperature 0.8, top-k 50) from a private generator: the global RNG, and so an
    exact resume, is untouched."""
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    input_ids, mask = left_pad(encoded, model.config.pad_token_id, device)
    longest = input_ids.shape[1]
    generator = torch.Generator(device=device).manual_seed(0)
    output = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                            temperature=0.8, top_k=50, eos_token_id=model.config.eos_token_id,
                            pad_token_id=model.config.pad_token_id, generator=generator)
    lines = [f"**{prompt}**{tokenizer.decode(row[longest:].tolist(), skip_special_tokens=True)}"
             for prompt, row in zip(prompts, output)]
    return {"samples/text": "\n\n".join(lines)}


def build_lm_task(model, config, cache: TextTokenCache, args, context) -> TrainingTask:
    seq_len = args.seq_len
    train = PackedBatches(cache.tokens("train"), seq_len, args.batch_size, seed=args.seed, rank=context.rank,
                          world_size=context.world_size)
    val = evaluation_batches(cache.tokens("val"), seq_len, args.batch_size, args.eval_batches)
    val = [{"input_ids": ids} for ids in val]
    tokenizer = cache.load_tokenizer()
    if context.rank == 0:  # generate_text.py --run_dir finds it here
        tokenizer.save_pretrained(context.run_dir / "tokenizer")

    def evaluate(eval_model) -> dict:
        loss = evaluate_mean_loss(eval_model, val, lm_loss, context.device)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def samples(eval_model) -> dict:
        was_training = eval_model.training
        texts = _sample_texts(eval_model, tokenizer, args.sample_prompts, args.sample_max_new_tokens, context.device)
        eval_model.train(was_training)
        return texts

    return TrainingTask(
        model=model, config=config, train_batch=lambda i: {"input_ids": train.batch(i)}, loss=lm_loss,
        batch_tokens=lambda batch: batch["input_ids"].numel(), evaluate=evaluate, samples=samples,
        flops_per_token=model.flops_per_token(seq_len), generation_steps=args.generation_steps or args.eval_steps,
    )
