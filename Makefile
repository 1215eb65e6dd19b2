# The README's two commands: `make demo` (main job, offline) and `make test` (whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-slow install install-dev lint bench demo-model demo-captioner demo-answerer demo-coca clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev,ray,ocr]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Main job: sample library -> index with the bundled demo model (SQLite in ~/.local/share/clipsearch) -> UI
demo: install
	$(VENV)/bin/clipsearch demo

## Test suite a person can wait for (unit, integration, PostgreSQL, AppTest, browser e2e): <= 10 min on 2 cores
test: install-dev
	./scripts/system-deps.sh
	$(VENV)/bin/ruff check clipsearch indexer search ui tests bench
	$(PY) -m pytest -q -m "not slow"

## The long tier: retrains the demo model from scratch (~32 min); CI runs it after `make test`
test-slow: install-dev
	$(PY) -m pytest -q -m slow

lint: install-dev
	$(VENV)/bin/ruff check clipsearch indexer search ui tests bench

## Reproduce the bundled demo model (indexer/model/demo)
demo-model: install
	$(VENV)/bin/clipsearch make-sample data/train --count 20000 --seed 1
	$(VENV)/bin/clipsearch train data/train --captions captions_augmented.txt \
	  --model indexer/model/clipsearch-demo.json:none --out indexer/model/demo \
	  --epochs 10 --batch-size 64 --lr 2e-3 --resize-mode squash --hard-batches 0.75 --hard-word 3 \
	  --augment dihedral --save-half

## Reproduce the demo captioner and question answerer (about 8 minutes each on 2 cores)
demo-captioner: install
	$(PY) bench/captions.py --out indexer/model/demo_captioner

demo-answerer: install
	$(PY) bench/questions.py --out indexer/model/demo_answerer

## Reproduce the demo CoCa (indexer/model/demo_coca): a small open_clip CoCa trained from scratch on make-sample
## photos (seed 3) with CoCaLoss, then measured on held-out ones (seed 7); about 13 minutes on 2 shared cores
demo-coca: install
	$(PY) bench/coca_captioner.py --out indexer/model/demo_coca

bench: install
	$(PY) bench/index_throughput.py
	$(PY) bench/vector_search.py
	$(PY) bench/tagging.py
	$(PY) bench/query_latency.py

clean:
	rm -rf $(VENV) data test-artifacts
