"""Prefect tasks: thin wrappers over ``datasetdm.dvc_pipeline`` and ``datasetdm.orchestration``.

A stage task asks DVC to bring its stage up to date (``dvc repro --single-item``):
DVC decides whether it is stale and records the run in ``dvc.lock``, so a Prefect run
and a ``dvc repro`` share one notion of "done". Prefect adds what it is good at:
retries where a retry can help, the Dask shard map, schedules, logs and the artifact.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_markdown_artifact

from datasetdm import dvc_pipeline, orchestration
from datasetdm.config import Params

# Generation resumes from the shards already on disk (its outputs persist across
# `dvc repro`), so a retry after a crash only redoes unfinished shards. The curate stage
# starts FiftyOne's MongoDB; a slow first start can time out once.
RETRIES = {"generate": 2, "curate": 2}


@task(name="stage")
def _repro(stage: str) -> dict:
    return asdict(dvc_pipeline.repro_stage(".", stage))


def repro(stage: str) -> dict:
    """Bring ``stage`` up to date through DVC, as a task named after the stage."""
    return _repro.with_options(name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=2)(stage)


@task(name="set-params")
def apply_params(overrides: list[str]) -> dict:
    return dvc_pipeline.apply_params(".", overrides)


@task(name="regeneration-round")
def regeneration_round(budget: int | None) -> dict:
    """The next regeneration round as one DVC experiment (``dvc exp run rounds``)."""
    return orchestration.regeneration_round(".", budget)


@task(name="is-stale")
def is_stale(stage: str) -> bool:
    return dvc_pipeline.is_stale(".", stage)


@task(name="plan-shards")
def plan_shards(params: Params) -> int:
    return orchestration.plan_shards(params)


@task(name="generate-shard", retries=2, retry_delay_seconds=2)
def generate_shard(params: Params, k: int) -> dict:
    return orchestration.make_shard(params, k)


@task(name="write-manifest")
def write_manifest(params: Params, entries: list[dict]) -> dict:
    return orchestration.finish_generate(params, entries)


@task(name="dvc-commit")
def commit_stage(stage: str) -> None:
    dvc_pipeline.commit_stage(".", stage)


@task(name="publish-report")
def publish_report(params: Params, summary: dict) -> str:
    """The run report and metrics as a markdown artifact on the flow run."""
    markdown = orchestration.run_artifact(params, summary)
    create_markdown_artifact(markdown=markdown, key="factory-report", description="datasetdm run report and metrics")
    return markdown
