# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow smoke lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cpsam demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every study script at toy scale on the CPU (what CI runs after `make test`).
smoke: $(STAMP)
	PY=$(PY) bash scripts/prepare_paper_datasets.sh --smoke
	PY=$(PY) bash scripts/train_cpsam_paper.sh --smoke
	PY=$(PY) bash scripts/distill_study.sh --smoke
	PY=$(PY) bash scripts/eval_paper.sh --smoke
	PY=$(PY) bash scripts/workflow_he.sh --smoke

# Speed/memory against cellpose on this machine (minutes each; run on an otherwise idle machine).
bench: $(STAMP)
	$(PY) -m benchmarks.bench_dynamics
	$(PY) -m benchmarks.bench_metrics
	$(PY) -m benchmarks.bench_segment
	$(PY) -m benchmarks.bench_model
	$(PY) -m benchmarks.bench_augment
	$(PY) -m benchmarks.bench_train

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on broken links and missing nav entries.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info
