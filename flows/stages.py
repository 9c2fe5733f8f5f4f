"""One flow per stage, for running (or scheduling) a single step as a deployment.

Each flow parses the params file once and calls the stage's task; the task's cache
makes a run whose inputs have not changed a no-op. ``generate`` can map its shards
over Dask workers (see ``flows/generate.py``).
"""

from __future__ import annotations

from prefect import flow

from datasetdm.config import load_params
from flows.generate import generate_sharded
from tasks import stages


@flow(name="train-decoder", log_prints=True)
def train_decoder(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    stages.real_data(params)
    return stages.train_decoder(params)


@flow(name="expand-prompts", log_prints=True)
def expand_prompts(params_path: str = "params.yaml") -> dict:
    return stages.expand_prompts(load_params(params_path))


@flow(name="generate", log_prints=True)
def generate(params_path: str = "params.yaml", workers: int = 1, address: str | None = None) -> dict:
    """workers > 1 or a Dask scheduler ``address``: shards mapped over Dask workers."""
    if workers > 1 or address:
        return generate_sharded(params_path, workers=workers, address=address)
    return stages.generate(load_params(params_path))


@flow(name="filter", log_prints=True)
def filter_samples(params_path: str = "params.yaml") -> dict:
    return stages.filter_samples(load_params(params_path))


@flow(name="export", log_prints=True)
def export(params_path: str = "params.yaml") -> dict:
    return stages.export(load_params(params_path))


@flow(name="curate", log_prints=True)
def curate(params_path: str = "params.yaml") -> dict:
    return stages.curate(load_params(params_path))
