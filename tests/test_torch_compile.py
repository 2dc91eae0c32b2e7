"""--torch_compile: a compiled training run has the losses of the eager run (shared loop, plain engine, gradient
checkpointing), and evaluation and samples still run.

Compiling the forward and backward of a 2-layer model with Inductor costs ~10 s with a warm Inductor cache
and ~2 minutes cold on 2 CPU cores (gcc builds the kernels): one compiled run per test."""

import socket

import pytest
import torch

from megatransformer_utils import MegaTransformerConfig
from model import build_model
from training.arguments import build_parser, check_arguments
from training.loop import start_run, train
from training.task import TrainingTask

STEPS = 4
# float32 on CPU: Inductor fuses and reorders reductions, so losses agree to rounding, not bit for bit
TOLERANCE = 1e-4


def recording_task(losses: list, evaluations: list) -> TrainingTask:
    """A 2-layer GQA model with rotary positions learning two fixed batches of random ids by heart; its loss
    values are appended to `losses`, its evaluation losses to `evaluations`."""
    config = MegaTransformerConfig.from_name("tiny").with_overrides(
        ["vocab_size=128", "hidden_size=32", "n_layers=2", "n_heads=4", "n_query_groups=2", "intermediate_size=64",
         "max_position_embeddings=32", "bos_token_id=null", "eos_token_id=null", "pad_token_id=null"])
    torch.manual_seed(0)
    model = build_model(config)

    def train_batch(i: int) -> dict:
        return {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i % 2))}

    def loss(model, batch, step):
        value = model(batch["input_ids"], labels=batch["input_ids"]).loss
        losses.append(value.item())
        return value

    def evaluate(model) -> dict:
        with torch.no_grad():
            ids = train_batch(0)["input_ids"]
            value = model(ids, labels=ids).loss.item()
        evaluations.append(value)
        return {"eval/loss": value}

    def samples(model) -> dict:
        return {"samples/text": str(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)[0].tolist())}

    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss, evaluate=evaluate,
                        samples=samples, generation_steps=STEPS, batch_size=lambda batch: batch["input_ids"].numel())


def run(tmp_path, name: str, *extra) -> tuple[list, list, dict]:
    args = build_parser("x").parse_args(["--run_name", name, "--runs_dir", str(tmp_path), "--device", "cpu",
                                         "--max_steps", str(STEPS), "--eval_steps", str(STEPS), "--save_steps", "100",
                                         "--learning_rate", "1e-2", "--warmup_steps", "0",
                                         "--gradient_accumulation_steps", "2", "--no_progress_bar", *extra])
    check_arguments(args)
    losses, evaluations = [], []
    summary = train(recording_task(losses, evaluations), args, start_run(args))
    return losses, evaluations, summary


@pytest.mark.slow
def test_compiled_training_has_the_eager_losses(tmp_path):
    flags = ["--use_gradient_checkpointing"]
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, eager_eval, eager_summary = run(tmp_path, "eager", *flags)
    assert not counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    compiled, compiled_eval, compiled_summary = run(tmp_path, "compiled", *flags, "--torch_compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the flag did compile
    assert len(compiled) == len(eager) == 2 * STEPS
    assert compiled == pytest.approx(eager, abs=TOLERANCE)
    assert eager[-1] < eager[1] - 0.1  # the weights did move (lr 1e-2): later losses test the optimizer steps too
    assert compiled_eval == pytest.approx(eager_eval, abs=TOLERANCE)
    assert compiled_summary["samples/text"] == eager_summary["samples/text"]


@pytest.mark.slow
def test_compiled_deepspeed_run_has_the_eager_losses(tmp_path, monkeypatch):
    """DeepSpeed's engine.compile() under ZeRO-2, as one rank in this process (gloo)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    flags = ["--use_deepspeed", "--deepspeed_config", "ds_config_zero-2.json"]
    try:
        eager, _, _ = run(tmp_path, "ds_eager", *flags)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled, _, _ = run(tmp_path, "ds_compiled", *flags, "--torch_compile")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert compiled == pytest.approx(eager, abs=TOLERANCE)
    assert eager[-1] < eager[1] - 0.1
