"""The language-modelling task for the shared loop: packed token windows from a text cache, next-token
loss, validation loss/perplexity, and text samples from fixed prompts.

A recurrent-depth model (model/megatransformer_recurrent.py) trains at the depth `sample_num_steps(step)`
draws for each optimizer step (logged as train/thinking_steps), and is evaluated at fixed depths
(eval/loss_steps_R) and under its exit criterion (eval/loss, eval/mean_thinking_steps)."""

import math

import torch

from data.text_cache import PackedBatches, TextTokenCache, evaluation_batches
from model.generation import left_pad
from model.megatransformer_recurrent import MegaTransformerRecurrentLM
from training.loop import evaluate_means
from training.task import LossTerms, TrainingTask

DEFAULT_PROMPTS = ("The", "In the beginning", "def main():", "The function returns")


def lm_loss(model, batch: dict, step: int = 0) -> torch.Tensor:
    """batch["input_ids"]: (B, T) → mean next-token cross-entropy (+ MoE auxiliary terms)."""
    return model(batch["input_ids"], labels=batch["input_ids"]).loss


def _recurrent_loss(recurrent: MegaTransformerRecurrentLM, rank: int):
    """The training loss of `recurrent` at the depth drawn for each step (on every rank alike, unless the
    config's recurrent_depth_per_rank)."""

    def loss(model, batch: dict, step: int) -> LossTerms:
        num_steps = recurrent.sample_num_steps(step, rank)
        output = model(batch["input_ids"], labels=batch["input_ids"], num_steps=num_steps)
        return LossTerms(output.loss, logs={"thinking_steps": num_steps})

    return loss


def _recurrent_metrics(num_steps):
    def measure(model, batch: dict) -> dict:
        output = model(batch["input_ids"], labels=batch["input_ids"], num_steps=num_steps)
        return {"loss": output.loss, "thinking_steps": output.thinking_steps.float().mean()}

    return measure


def evaluate_lm(model, val: list, device: torch.device, eval_thinking_steps=()) -> dict:
    """Validation loss and perplexity; for a recurrent model also the loss at each fixed depth in
    `eval_thinking_steps` and the mean depth its exit criterion chose."""
    if not isinstance(model, MegaTransformerRecurrentLM):
        loss = evaluate_means(model, val, lambda m, batch: {"loss": lm_loss(m, batch)}, device)["loss"]
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    adaptive = evaluate_means(model, val, _recurrent_metrics(None), device)
    metrics = {"eval/loss": adaptive["loss"], "eval/perplexity": math.exp(min(adaptive["loss"], 50.0)),
               "eval/mean_thinking_steps": adaptive["thinking_steps"]}
    for num_steps in eval_thinking_steps:
        metrics[f"eval/loss_steps_{num_steps}"] = evaluate_means(model, val, _recurrent_metrics(num_steps), device)["loss"]
    return metrics


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
        return evaluate_lm(eval_model, val, context.device, getattr(args, "eval_thinking_steps", ()))

    def samples(eval_model) -> dict:
        was_training = eval_model.training
        texts = _sample_texts(eval_model, tokenizer, args.sample_prompts, args.sample_max_new_tokens, context.device)
        eval_model.train(was_training)
        return texts

    is_recurrent = isinstance(model, MegaTransformerRecurrentLM)
    return TrainingTask(
        model=model, config=config, train_batch=lambda i: {"input_ids": train.batch(i)},
        loss=_recurrent_loss(model, context.rank) if is_recurrent else lm_loss,
        batch_size=lambda batch: batch["input_ids"].numel(), evaluate=evaluate, samples=samples,
        flops_per_token=model.flops_per_token(seq_len), generation_steps=args.generation_steps or args.eval_steps,
    )
