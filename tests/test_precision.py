"""bfloat16 where it is fast: CPU flags, the one warning where it is emulated, and make demo's choice; TF32 for a GPU
run's float32 matmuls (--no_tf32 keeps full float32)."""

import logging

import pytest
import torch

import preprocess_text_dataset
import pretrain_wm
from training import precision


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has exactly the given /proc/cpuinfo flags."""
    def set_flags(*flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    return set_flags


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 amx_bf16 avx512f\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags.__wrapped__(str(cpuinfo)) == {"fpu", "sse", "avx2", "amx_bf16", "avx512f"}
    assert precision.cpu_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("flags, native", [(("avx2", "fma"), False), (("avx512f", "avx512bw"), False),
                                          (("avx512f", "avx512_bf16"), True), (("amx_tile", "amx_bf16"), True)])
def test_native_bf16_follows_the_cpu_flags(cpu_with, flags, native):
    cpu_with(*flags)
    assert precision.has_native_bf16(torch.device("cpu")) is native
    assert precision.fast_precision_flags(torch.device("cpu")) == (["--bf16"] if native else [])


def test_warning_only_for_emulated_bf16(cpu_with, caplog):
    cpu = torch.device("cpu")
    cpu_with("avx2")
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert not precision.warn_if_bf16_is_emulated(False, cpu)  # float32 asked: nothing to say
        assert not caplog.records
        assert precision.warn_if_bf16_is_emulated(True, cpu)
    assert len(caplog.records) == 1 and "emulated" in caplog.text and "Drop --bf16" in caplog.text
    cpu_with("amx_bf16")
    caplog.clear()
    assert not precision.warn_if_bf16_is_emulated(True, cpu) and not caplog.records


def test_a_bf16_run_on_an_emulating_cpu_says_so_once(tmp_path, cpu_with, caplog):
    cache = tmp_path / "cache"
    assert preprocess_text_dataset.main(["--dataset_name", "builtin:text", "--max_chars", "20000", "--train_tokenizer",
                                         "--vocab_size", "300", "--output_dir", str(cache)]) == 0
    cpu_with("avx2")
    args = ["--config", "tiny", "--data_dir", str(cache), "--runs_dir", str(tmp_path / "runs"), "--seq_len", "16",
            "--batch_size", "2", "--max_steps", "2", "--eval_steps", "2", "--eval_batches", "1", "--no_progress_bar",
            "--sample_max_new_tokens", "2"]
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert pretrain_wm.main([*args, "--run_name", "bf16", "--bf16"]) == 0
        assert sum("emulated" in record.message for record in caplog.records) == 1
        caplog.clear()
        assert pretrain_wm.main([*args, "--run_name", "fp32"]) == 0
        assert not caplog.records


def test_a_gpu_run_uses_tf32_unless_told_not_to():  # conftest restores the precision
    # setting the precision needs no GPU, so the CUDA branch runs here too
    assert torch.get_float32_matmul_precision() == "highest"  # PyTorch's default
    assert precision.use_tf32_on_gpu(torch.device("cpu")) == "highest"  # a CPU run changes nothing
    assert precision.use_tf32_on_gpu(torch.device("cuda")) == "high"
    assert precision.use_tf32_on_gpu(torch.device("cuda", 1), enabled=False) == "highest"


def test_the_loop_asks_for_tf32_on_the_training_device(monkeypatch):
    from training import loop
    from training.arguments import build_parser

    seen = []
    monkeypatch.setattr(loop, "use_tf32_on_gpu", lambda device, enabled: seen.append((device.type, enabled)))
    for flags in ([], ["--no_tf32"]):
        loop.start_run(build_parser("x").parse_args(["--run_name", "x", "--device", "cpu", *flags]))
    assert seen == [("cpu", True), ("cpu", False)]
