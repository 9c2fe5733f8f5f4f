"""One flow per stage, for running (or scheduling) a single step as a deployment.

Each brings its stage, and the stages it depends on, up to date through DVC
(``flows.factory.run_stages``): a stage DVC finds up to date is skipped. Generation's
flow, which can map shards over Dask workers, is in ``flows/generate.py``.
"""

from __future__ import annotations

import contextlib

from prefect import flow

from flows.factory import hold, run_stages


def _reach(stage: str, project_dir: str, set_params: list[str] | None) -> dict:
    with contextlib.chdir(project_dir), hold():
        return run_stages([stage], set_params)


@flow(name="train-decoder", log_prints=True)
def train_decoder(project_dir: str = ".", set_params: list[str] | None = None) -> dict:
    """The few-shot P-Decoder (and the labelled real sets it trains on)."""
    return _reach("train-decoder", project_dir, set_params)


@flow(name="expand-prompts", log_prints=True)
def expand_prompts(project_dir: str = ".", set_params: list[str] | None = None) -> dict:
    """The prompt plan."""
    return _reach("expand-prompts", project_dir, set_params)


@flow(name="filter", log_prints=True)
def filter_samples(project_dir: str = ".", set_params: list[str] | None = None) -> dict:
    """Quality filtering of the generated samples (and generation, if stale)."""
    return _reach("filter", project_dir, set_params)


@flow(name="export", log_prints=True)
def export(project_dir: str = ".", set_params: list[str] | None = None) -> dict:
    """COCO / VOC export of the kept samples (and everything before it, if stale)."""
    return _reach("export", project_dir, set_params)


@flow(name="curate", log_prints=True)
def curate(project_dir: str = ".", set_params: list[str] | None = None) -> dict:
    """FiftyOne curation of the export (and everything before it, if stale)."""
    return _reach("curate", project_dir, set_params)
