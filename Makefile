# `make setup` builds .venv; `make test` and `make demo` rebuild it only when the requirements change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-$(shell cat requirements.txt requirements-deepspeed.txt | sha256sum | cut -c1-16)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-deepspeed.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -r requirements-deepspeed.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) generate_text.py --config tiny --prompt "The quick brown fox" --max_new_tokens 48

bench: $(STAMP)
	$(PY) bench/lm_throughput.py

clean:
	rm -rf $(VENV)
