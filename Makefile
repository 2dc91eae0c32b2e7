# `make setup` builds .venv; `make test` and `make demo` rebuild it only when the requirements change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-$(shell cat requirements.txt requirements-deepspeed.txt | sha256sum | cut -c1-16)

.PHONY: setup test demo bench clean speech

setup: $(STAMP) speech

# builtin:speech (data/builtin_speech.py) synthesises speech offline with espeak-ng and flite: install them where
# apt is available and we are root; elsewhere the speech tests skip and the preprocessor says how to install them.
speech:
	@for program in espeak-ng flite; do command -v $$program >/dev/null || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && apt-get install -y -qq $$program >/dev/null; } || \
		echo "note: $$program not installed (apt-get install $$program)"; done

# The stamp's name holds the requirements' hash, so a change of content names a stamp that does not exist yet;
# no file prerequisites, so a checkout that only touches requirements*.txt (same content) does not rebuild .venv.
$(STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -r requirements-deepspeed.txt
	touch $@

test: $(STAMP) speech
	$(PY) -m pytest -q tests

# The main job on the built-in data: cache the corpus once, then train `tiny` for a few minutes on two
# DeepSpeed ZeRO-2 ranks (CPU ranks over gloo when there is no GPU), in bfloat16 where the hardware has it
# (a GPU, or a CPU with AMX / AVX-512 BF16) and float32 where bfloat16 would be emulated (several times slower).
demo: $(STAMP)
	test -f cached_datasets/text/meta.json || $(PY) preprocess_text_dataset.py --dataset_name builtin:text --train_tokenizer
	$(VENV)/bin/deepspeed --num_gpus=2 pretrain_wm.py --use_deepspeed --deepspeed_config ds_config_zero-2.json \
		$$($(PY) -c 'from training.precision import fast_precision_flags; print(*fast_precision_flags())') \
		--run_name demo --overwrite_run --config tiny --max_steps 200 --batch_size 8 --seq_len 256 \
		--learning_rate 2e-3 --warmup_steps 20 --logging_steps 10 --eval_steps 50 --save_steps 100

bench: $(STAMP)
	$(PY) bench/lm_throughput.py

clean:
	rm -rf $(VENV)
