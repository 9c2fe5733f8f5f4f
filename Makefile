# The two commands a newcomer needs:  make run  (the factory, end to end)  and  make test.
# Both set up everything first (idempotent): a venv with the CPU torch held by constraints.txt.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Third-party telemetry and update checks off (no network here, and none wanted).
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export PYTHONUNBUFFERED := 1

.PHONY: setup run flow test test-fast pretrain bench clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@echo "installing the stack into $(VENV) (first time: about 3 minutes)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	@$(VENV)/bin/python -c "import torch, diffusers, prefect, dvc, pycocotools; assert '+cpu' in torch.__version__, torch.__version__"
	@touch $(STAMP)

setup: $(STAMP)

## run: the whole factory on the embedded toy backbone (dvc repro), then the report
run: setup
	dvc repro
	@echo; echo "dataset: data/export (annotations.json, masks/, dataset.json, grid.png)"; echo "report:  reports/report.md"; echo "metrics:"; dvc metrics show

## flow: the same stages as one Prefect flow run (temporary local Prefect server)
flow: setup
	python -m flows.factory params.yaml

## test: the whole suite, end-to-end tests included
test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

## pretrain: retrain the embedded toy backbone into models/toy-backbone (~15 min on 2 cores)
pretrain: setup
	python -m datasetdm pretrain

bench: setup
	python benchmarks/capture_overhead.py

clean:
	rm -rf data models/decoder metrics reports
