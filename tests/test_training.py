"""The shared training loop end to end through pretrain_wm.py: exact resume (also after SIGTERM), TensorBoard
output, checkpoint rotation, two-rank DeepSpeed ZeRO-1/2/3 runs on CPU (exact resume, exported weights), that the
loss falls, non-finite losses, and clear errors for bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import preprocess_text_dataset
import pretrain_wm
from data.text_cache import TextTokenCache, evaluation_batches
from helpers import (DEEPSPEED_CHECKPOINT_FILES, assert_resumed_run_matches, checkpoint_names, checkpoint_weights, differs,
                     event_files, events, loop_args, only_events, scalars, tiny_lm_task, trainer_state)
from megatransformer_utils import MegaTransformerConfig
from model import build_model, load_pretrained
from training.language_modeling import evaluate_lm
from training.loop import TrainingStopped, start_run, train
from two_ranks import run_two_ranks

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 512
# `tiny` made smaller still, so that a CPU step takes a fraction of a second
SMALL = ["--set", "hidden_size=64", "--set", "n_layers=2", "--set", "intermediate_size=176"]
# Flags shared by the runs of the exact-resume test (run A straight through, run B stopped and resumed)
# (20 steps, so that the SIGTERM sent after checkpoint-2 surely lands before the end even on a fast machine)
RESUME_STEPS = 20
RESUME_FLAGS = ["--max_steps", str(RESUME_STEPS), "--logging_steps", "1", "--save_steps", "2",
                "--save_total_limit", "2", "--eval_steps", "5", "--set", "hidden_dropout=0.1", *SMALL]


# ----- helpers -----

@pytest.fixture(scope="module")
def text_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "cache"
    assert preprocess_text_dataset.main(["--dataset_name", "builtin:text", "--max_chars", "300000",
                                         "--train_tokenizer", "--vocab_size", str(VOCAB_SIZE),
                                         "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def pretrain_args(cache: Path, runs: Path, run_name: str, *extra) -> list[str]:
    return ["--config", "tiny", "--data_dir", str(cache), "--runs_dir", str(runs), "--run_name", run_name,
            "--seq_len", "64", "--batch_size", "4", "--no_progress_bar", "--sample_prompts", "The",
            "--sample_max_new_tokens", "4", *map(str, extra)]


def pretrain(cache: Path, runs: Path, run_name: str, *extra) -> int:
    """pretrain_wm.main in this process; its exit code."""
    return pretrain_wm.main(pretrain_args(cache, runs, run_name, *extra))


def pretrain_command(cache: Path, runs: Path, run_name: str, *extra) -> list[str]:
    return [sys.executable, "pretrain_wm.py", *pretrain_args(cache, runs, run_name, *extra)]


# ----- exact resume, SIGTERM, rotation (plain engine, float32) -----

@pytest.fixture(scope="module")
def run_a(text_cache, runs_dir) -> Path:
    """RESUME_STEPS steps straight through."""
    assert pretrain(text_cache, runs_dir, "run_a", *RESUME_FLAGS) == 0
    return runs_dir / "run_a"


@pytest.fixture(scope="module")
def sigterm_run(text_cache, runs_dir):
    """Run B's first half: the same flags in a subprocess, sent SIGTERM once checkpoint-2 exists.
    Returns (completed process, run dir, the step it stopped at)."""
    run_dir = runs_dir / "run_b"
    process = subprocess.Popen(pretrain_command(text_cache, runs_dir, "run_b", *RESUME_FLAGS), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoint-2").is_dir():
            assert process.poll() is None, f"run ended before checkpoint-2: {process.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint-2 after 180 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    checkpoints = [int(name.split("-")[1]) for name in checkpoint_names(run_dir) if name.startswith("checkpoint-")]
    stop_step = max(checkpoints)
    assert stop_step < RESUME_STEPS, "SIGTERM arrived after the last step: the run is too fast for this test"
    # a copy outside the run: the resumed run B rotates checkpoint-STOP away
    shutil.copytree(run_dir / f"checkpoint-{stop_step}", runs_dir / "stopped_checkpoint")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), run_dir, stop_step


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sigterm_run):
    completed, run_dir, stop_step = sigterm_run
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert stop_step >= 3  # the signal was sent after checkpoint-2 appeared, so during step 3 or later
    # the fixture's copy: test_resume_after_sigterm_is_exact rotates checkpoint-STOP out of run_b
    stopped = run_dir.parent / "stopped_checkpoint"
    assert trainer_state(stopped)["step"] == stop_step
    assert (stopped / "model.safetensors").is_file()
    assert f"at step {stop_step}" in completed.stdout
    assert not list(run_dir.glob(".checkpoint-*.tmp"))


def test_sigterm_stop_is_reported(sigterm_run):
    completed, _, stop_step = sigterm_run
    assert f"stopped by SIGTERM at step {stop_step}" in completed.stdout + completed.stderr


def test_resume_after_sigterm_is_exact(text_cache, runs_dir, run_a, sigterm_run):
    _, run_b, stop_step = sigterm_run
    before = set(event_files(run_b))
    assert pretrain(text_cache, runs_dir, "run_b", *RESUME_FLAGS, "--resume_from_checkpoint", "latest") == 0
    resumed_files = [path for path in event_files(run_b) if path not in before]
    assert len(resumed_files) == 1
    resumed = events(resumed_files[0])
    straight = only_events(run_a)

    resumed_loss, straight_loss = scalars(resumed, "train/loss"), scalars(straight, "train/loss")
    steps = list(range(stop_step + 1, RESUME_STEPS + 1))
    assert sorted(resumed_loss) == steps
    assert [resumed_loss[step] for step in steps] == [straight_loss[step] for step in steps]
    assert scalars(resumed, "train/lr") == {step: scalars(straight, "train/lr")[step] for step in steps}
    assert scalars(resumed, "eval/loss")[RESUME_STEPS] == scalars(straight, "eval/loss")[RESUME_STEPS]

    final = f"checkpoint-{RESUME_STEPS}"
    weights_a = load_file(run_a / final / "model.safetensors")
    weights_b = load_file(run_b / final / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert trainer_state(run_a / final) == trainer_state(run_b / final)


def test_resume_without_rng_state_is_not_exact(text_cache, runs_dir, run_a, sigterm_run, monkeypatch):
    """The exact-resume test is sensitive: with dropout on, skipping the RNG restore changes the next loss."""
    _, _, stop_step = sigterm_run
    monkeypatch.setattr("training.checkpoints.set_rng_state", lambda state: None)
    assert pretrain(text_cache, runs_dir, "run_c", *RESUME_FLAGS,
                    "--resume_from_checkpoint", runs_dir / "stopped_checkpoint") == 0
    step = stop_step + 1
    assert scalars(only_events(runs_dir / "run_c"), "train/loss")[step] != \
        scalars(only_events(run_a), "train/loss")[step]


def test_checkpoint_rotation_keeps_the_newest(run_a):
    # save every 2 steps, keep 2: checkpoints 2, 4, ... were written and removed
    assert checkpoint_names(run_a) == [f"checkpoint-{RESUME_STEPS - 2}", f"checkpoint-{RESUME_STEPS}"]
    assert not list(run_a.glob(".checkpoint-*"))
    for name in ("config.yaml", "model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pt"):
        assert (run_a / f"checkpoint-{RESUME_STEPS}" / name).is_file(), name
    assert trainer_state(run_a / f"checkpoint-{RESUME_STEPS}")["step"] == RESUME_STEPS


def test_overwrite_run_starts_afresh(text_cache, tmp_path):
    assert pretrain(text_cache, tmp_path, "again", *SMALL, "--max_steps", 3, "--save_steps", 1) == 0
    assert pretrain(text_cache, tmp_path, "again", *SMALL, "--max_steps", 2, "--save_steps", 1,
                    "--overwrite_run") == 0
    run_dir = tmp_path / "again"
    assert checkpoint_names(run_dir) == ["checkpoint-1", "checkpoint-2"]  # checkpoint-3 of the old run is gone
    assert sorted(scalars(only_events(run_dir), "train/loss")) == [2]  # and so are its events


# ----- learning and TensorBoard -----

@pytest.fixture(scope="module")
def learning_run(text_cache, runs_dir) -> Path:
    assert pretrain(text_cache, runs_dir, "learning", *SMALL, "--batch_size", 8, "--max_steps", 40,
                    "--learning_rate", 3e-3, "--logging_steps", 1, "--eval_steps", 10, "--save_steps", 1000) == 0
    return runs_dir / "learning"


def test_loss_falls(learning_run):
    """Measured (deterministic on CPU): train loss 6.23 at step 1 → ~5.1 at steps 36-40; eval loss 5.46 at step 10
    → 5.14 at step 40. The bounds leave ~0.3 nat of margin (0.2 for the eval-to-eval drop)."""
    accumulator = only_events(learning_run)
    train_loss, eval_loss = scalars(accumulator, "train/loss"), scalars(accumulator, "eval/loss")
    uniform = math.log(VOCAB_SIZE)  # 6.24: the loss of a model that knows nothing
    assert abs(train_loss[1] - uniform) < 0.3
    last = sum(train_loss[step] for step in range(36, 41)) / 5
    assert last < train_loss[1] - 0.8
    assert sorted(eval_loss) == [10, 20, 30, 40]
    assert eval_loss[40] < uniform - 0.8
    assert eval_loss[40] < eval_loss[10] - 0.1
    assert scalars(accumulator, "eval/perplexity")[40] == pytest.approx(math.exp(eval_loss[40]), rel=1e-5)


def test_tensorboard_scalars_and_text(learning_run, text_cache):
    accumulator = only_events(learning_run)
    tags = accumulator.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/skipped_nonfinite",
                "eval/loss", "eval/perplexity"):
        assert tag in tags["scalars"], tag
        assert all(math.isfinite(value) for value in scalars(accumulator, tag).values()), tag
    if not torch.cuda.is_available():
        assert "train/mfu" not in tags["scalars"]  # no peak FLOPs figure for a CPU
    assert sorted(scalars(accumulator, "train/loss")) == list(range(1, 41))
    assert max(scalars(accumulator, "train/lr").values()) == pytest.approx(3e-3)
    assert all(value > 0 for value in scalars(accumulator, "train/tokens_per_sec").values())

    # add_text writes tensors tagged TAG/text_summary for the text plugin
    assert set(tags["tensors"]) >= {"config/text_summary", "samples/text/text_summary"}
    for tag in ("config/text_summary", "samples/text/text_summary"):
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    config_text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "vocab_size: 512" in config_text and "hidden_size: 64" in config_text
    samples = accumulator.Tensors("samples/text/text_summary")
    assert [event.step for event in samples] == [10, 20, 30, 40]  # every eval_steps (the default generation_steps)
    assert samples[-1].tensor_proto.string_val[0].decode().startswith("**The**")

    config = MegaTransformerConfig.from_yaml(learning_run / "config.yaml")
    cache = TextTokenCache(text_cache)
    assert config.vocab_size == cache.vocab_size == len(cache.load_tokenizer()) == VOCAB_SIZE
    assert (config.hidden_size, config.n_layers, config.eos_token_id) == (64, 2, cache.eos_token_id)
    assert MegaTransformerConfig.from_yaml(learning_run / "checkpoint-40" / "config.yaml") == config


# ----- DeepSpeed ZeRO-1/2/3, two CPU ranks: one launch for all stages -----

# Every stage trains DS_STEPS steps straight through, then again from the straight run's checkpoint-DS_STOP. ZeRO-2
# also covers bf16, gradient accumulation and gradient checkpointing; ZeRO-1 and ZeRO-3 run in float32.
DS_STEPS, DS_STOP = 4, 2
ZERO_STAGES = {
    1: [],
    2: ["--bf16", "--gradient_accumulation_steps", "2", "--use_gradient_checkpointing"],
    3: [],
}


def deepspeed_flags(stage: int, deepspeed_config: Path) -> list[str]:
    return ["--use_deepspeed", "--deepspeed_config", deepspeed_config, "--max_steps", str(DS_STEPS),
            "--warmup_steps", "1", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", str(DS_STOP),
            "--eval_steps", str(DS_STEPS), "--eval_batches", "4", "--set", "hidden_dropout=0.1", *SMALL,
            *ZERO_STAGES[stage]]


@pytest.fixture(scope="module")
def deepspeed_runs(text_cache, tmp_path_factory) -> tuple[Path, str]:
    """(runs directory, launcher output): for each stage, run zS straight through and zS_resumed from zS's
    checkpoint-DS_STOP, all in one two-rank launch."""
    runs = tmp_path_factory.mktemp("deepspeed_runs")
    configs = {stage: REPO / f"ds_config_zero-{stage}.json" for stage in ZERO_STAGES}
    # ZeRO-3 keeps weights under stage3_param_persistence_threshold elements whole on every rank, and every weight
    # of this tiny model is under the shipped 1e5: without 0 here nothing would be partitioned
    zero3 = json.loads(configs[3].read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    configs[3] = runs / "ds_config_zero-3_partition_all.json"
    configs[3].write_text(json.dumps(zero3))
    argument_lists = []
    for stage in ZERO_STAGES:
        flags = deepspeed_flags(stage, configs[stage])
        argument_lists.append(pretrain_args(text_cache, runs, f"z{stage}", *flags))
        argument_lists.append(pretrain_args(text_cache, runs, f"z{stage}_resumed", *flags, "--resume_from_checkpoint",
                                            runs / f"z{stage}" / f"checkpoint-{DS_STOP}"))
    return runs, run_two_ranks("pretrain_wm.py", *argument_lists)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(ZERO_STAGES))
def test_deepspeed_two_ranks_checkpoint_layout(deepspeed_runs, stage):
    runs, output = deepspeed_runs
    assert f"finished {runs / f'z{stage}'} at step {DS_STEPS}" in output
    run_dir = runs / f"z{stage}"
    assert checkpoint_names(run_dir) == [f"checkpoint-{DS_STOP}", f"checkpoint-{DS_STEPS}"]
    checkpoint = run_dir / f"checkpoint-{DS_STEPS}"
    for name in DEEPSPEED_CHECKPOINT_FILES:
        assert (checkpoint / name).exists(), name
    assert not (checkpoint / "optimizer.pt").exists()
    accumulation = 2 if stage == 2 else 1
    for name in (f"z{stage}", f"z{stage}_resumed"):
        state = trainer_state(runs / name / f"checkpoint-{DS_STEPS}")
        assert (state["step"], state["micro_batches"], state["world_size"]) == (DS_STEPS, DS_STEPS * accumulation, 2)
        # a batch is 4 x 64 tokens; each step is `accumulation` micro-batches on each of 2 ranks
        assert state["tokens"] == DS_STEPS * accumulation * 2 * 4 * 64
    weights = load_file(checkpoint / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16 if stage == 2 else torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(ZERO_STAGES))
def test_deepspeed_two_ranks_resume_is_exact(deepspeed_runs, stage):
    """The run resumed from checkpoint-DS_STOP logs the straight run's losses and learning rates and ends with its
    weights. DeepSpeed's restored engine recomputes the same float32 (ZeRO-2: bf16 with float32 masters) numbers in
    the same order, so the runs agree to the bit on CPU; the tolerance (1e-6 relative) only allows for a reduction
    order that another gloo or DeepSpeed version may change. A resume that restored nothing would start from the
    initial weights again: its step-3 loss differs from the straight run's by ~0.2."""
    runs, _ = deepspeed_runs
    straight_dir, resumed_dir = runs / f"z{stage}", runs / f"z{stage}_resumed"
    resumed = only_events(resumed_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert sorted(scalars(resumed, tag)) == list(range(DS_STOP + 1, DS_STEPS + 1)), tag
    assert_resumed_run_matches(straight_dir, resumed_dir, ("train/loss", "train/lr", "train/grad_norm", "eval/loss"),
                               DS_STEPS, rel=1e-6, atol=1e-7)
    # the resumed steps trained
    assert differs(checkpoint_weights(straight_dir, DS_STOP), checkpoint_weights(straight_dir, DS_STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_exported_weights_reproduce_the_logged_eval_loss(deepspeed_runs, text_cache, stage):
    """model.safetensors holds every weight, also under ZeRO-3 (which partitions the weights themselves): the model
    load_pretrained reads from it, evaluated in this process on the same validation batches, gives the eval loss
    the two ranks logged (float32; they split the batches and summed in float64)."""
    runs, _ = deepspeed_runs
    checkpoint = runs / f"z{stage}" / f"checkpoint-{DS_STEPS}"
    model = load_pretrained(checkpoint, dtype=torch.float32)
    cache = TextTokenCache(text_cache)
    val = [{"input_ids": ids} for ids in evaluation_batches(cache.tokens("val"), 64, 4, 4)]
    loss = evaluate_lm(model, val, torch.device("cpu"))["eval/loss"]
    logged = scalars(only_events(runs / f"z{stage}"), "eval/loss")[DS_STEPS]
    assert loss == pytest.approx(logged, rel=1e-5)
    untrained = evaluate_lm(build_model(model.config), val, torch.device("cpu"))["eval/loss"]
    assert abs(untrained - logged) > 0.05  # the comparison can tell trained weights from fresh ones


# ----- non-finite losses (the loop directly, with a fake task) -----

class StepRecorder:
    """Extra checkpoint state for the loop: the steps after_step saw, saved as JSON."""

    def __init__(self):
        self.steps = []

    def after_step(self, model, step: int) -> None:
        self.steps.append(step)

    def save(self, directory: Path) -> None:
        (directory / "steps.json").write_text(json.dumps(self.steps))

    def load(self, directory: Path) -> None:
        self.steps = json.loads((directory / "steps.json").read_text())


def test_after_step_runs_each_step_and_extra_state_resumes(tmp_path):
    first = StepRecorder()
    task = tiny_lm_task(set())
    task.after_step, task.extra_state = first.after_step, first
    args = loop_args(tmp_path, "extras", "--save_steps", 2, "--max_steps", 3)
    train(task, args, start_run(args))
    assert first.steps == [1, 2, 3]
    assert json.loads((tmp_path / "extras" / "checkpoint-2" / "steps.json").read_text()) == [1, 2]

    resumed = StepRecorder()
    task = tiny_lm_task(set())
    task.after_step, task.extra_state = resumed.after_step, resumed
    args = loop_args(tmp_path, "extras", "--save_steps", 2, "--max_steps", 4,
                     "--resume_from_checkpoint", tmp_path / "extras" / "checkpoint-2")
    train(task, args, start_run(args))
    assert resumed.steps == [1, 2, 3, 4]  # [1, 2] restored from checkpoint-2, then steps 3 and 4


def test_the_logged_loss_is_the_window_mean_summed_without_item_calls(tmp_path, monkeypatch):
    """train/loss at a log line is the mean of the micro-batch losses since the last one; the loop sums them on
    the device and reads them back only when it logs (no `.item()` per micro-batch, which waits for a GPU)."""
    task, losses, item_calls = tiny_lm_task(set()), [], []
    loss_of = task.loss

    def recorded_loss(*args, **kwargs):
        terms = loss_of(*args, **kwargs)
        losses.append((terms.loss if hasattr(terms, "loss") else terms).detach().clone())
        return terms

    task.loss = recorded_loss
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: item_calls.append(self.shape) or item(self))
    args = loop_args(tmp_path, "window", "--max_steps", 4, "--logging_steps", 2, "--gradient_accumulation_steps", 3)
    context = start_run(args)
    train(task, args, context)
    assert item_calls == [] and len(losses) == 12
    logged = scalars(only_events(context.run_dir), "train/loss")
    assert logged == pytest.approx({2: float(torch.stack(losses[:6]).double().mean()),
                                    4: float(torch.stack(losses[6:]).double().mean())}, rel=1e-6)  # float32 events


def test_one_nonfinite_loss_is_skipped(tmp_path):
    args = loop_args(tmp_path, "one_nan", "--gradient_accumulation_steps", 2)
    context = start_run(args)
    summary = train(tiny_lm_task({2}), args, context)
    assert summary["step"] == 4 and summary["skipped_nonfinite"] == 1 and summary["stopped_by"] is None
    # the NaN micro-batch was replaced by the next one: 4 steps x 2 finite micro-batches + 1 skipped
    state = trainer_state(context.run_dir / "checkpoint-4")
    assert state["micro_batches"] == 9 and state["skipped_nonfinite"] == 1 and state["tokens"] == 8 * 2 * 16
    weights = load_file(context.run_dir / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    accumulator = only_events(context.run_dir)
    assert all(math.isfinite(value) for value in scalars(accumulator, "train/loss").values())
    assert scalars(accumulator, "train/skipped_nonfinite") == {1: 0, 2: 1, 3: 1, 4: 1}


def test_nonfinite_counter_resets_after_a_finite_loss(tmp_path):
    args = loop_args(tmp_path, "nan_pairs", "--max_consecutive_nonfinite", 3)
    summary = train(tiny_lm_task({1, 2, 4, 5}), args, start_run(args))
    assert summary["step"] == 4 and summary["skipped_nonfinite"] == 4


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path):
    args = loop_args(tmp_path, "nan_run", "--max_consecutive_nonfinite", 3)
    with pytest.raises(TrainingStopped, match=r"3 non-finite losses in a row at step 2\b"):
        train(tiny_lm_task({1, 2, 3}), args, start_run(args))


# ----- bad input: a clear `error:` line, no traceback -----

BAD_INPUTS = {
    # name: (extra flags, substrings of the error line); {tmp} is the fixture's directory
    "missing_cache": (["--data_dir", "{tmp}/no_such_cache"], ["no text cache at", "no_such_cache",
                                                              "preprocess_text_dataset.py"]),
    "unknown_config": (["--config", "no_such_config"], ["unknown config name 'no_such_config'"]),
    "truncated_shard": (["--data_dir", "{tmp}/truncated"], ["train-00000.bin", "truncated", "--overwrite"]),
    "yaml_unknown_key": (["--config", "{tmp}/bad.yaml"], ["unknown config key 'n_layerz'", "n_layers"]),
    "existing_run": (["--run_name", "existing"], ["already holds checkpoint-1", "--resume_from_checkpoint latest",
                                                  "--overwrite_run"]),
    "resume_without_checkpoints": (["--run_name", "fresh", "--resume_from_checkpoint", "latest"],
                                   ["no checkpoint-* directory"]),
    "resume_from_non_checkpoint": (["--resume_from_checkpoint", "{tmp}"], ["not a checkpoint directory"]),
    "zero_steps": (["--max_steps", "0"], ["--max_steps must be at least 1"]),
    "zero_thinking_steps": (["--eval_thinking_steps", "4", "0"], ["--eval_thinking_steps must be at least 1, got 0"]),
    "seq_len_too_long": (["--seq_len", "4096"], ["--seq_len 4096 exceeds max_position_embeddings=256"]),
}


@pytest.fixture(scope="module")
def bad_input_results(text_cache, tmp_path_factory) -> dict:
    """Every BAD_INPUTS case run as its own pretrain_wm.py process, all at once (imports dominate)."""
    tmp = tmp_path_factory.mktemp("bad")
    truncated = tmp / "truncated"
    shutil.copytree(text_cache, truncated)
    shard = truncated / "train-00000.bin"
    os.truncate(shard, shard.stat().st_size - 3)
    (tmp / "bad.yaml").write_text("extends: tiny\nn_layerz: 3\n")
    runs = tmp / "runs"
    (runs / "existing" / "checkpoint-1").mkdir(parents=True)
    processes = {}
    for name, (flags, _) in BAD_INPUTS.items():
        flags = [flag.replace("{tmp}", str(tmp)) for flag in flags]
        command = pretrain_command(text_cache, runs, f"bad_{name}", "--max_steps", 2, *SMALL, *flags)
        processes[name] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(bad_input_results, case):
    completed = bad_input_results[case]
    assert completed.returncode != 0, completed.stdout
    assert "Traceback" not in completed.stderr, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, completed.stderr
    for expected in BAD_INPUTS[case][1]:
        assert expected in errors[0], errors[0]


def test_generate_text_from_a_run_dir(learning_run, capsys):
    """generate_text.py --run_dir takes the run's newest checkpoint and the tokenizer saved beside it."""
    import generate_text

    assert (learning_run / "tokenizer" / "tokenizer.json").is_file()
    assert generate_text.main(["--run_dir", str(learning_run), "--prompt", "The", "--prompt", "In the",
                               "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert ">>> The" in out and ">>> In the" in out and "random weights" not in out
    assert generate_text.main(["--run_dir", str(learning_run), "--checkpoint", "checkpoint-999", "--prompt", "x"]) == 1
    assert "checkpoint-999" in capsys.readouterr().err


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA B200", 2250e12), ("Tesla T4", None)])
def test_mfu_uses_the_peak_of_the_exact_gpu_variant(name, peak):
    from training.monitor import peak_flops_of

    assert peak_flops_of(name) == peak
