"""Prefect tasks: each factory stage, wrapped as it is in ``datasetdm.stages``.

No logic lives here; a task is the library function plus what Prefect needs to know:
its name, how often to retry, and its cache key. The key comes from
``datasetdm.orchestration.cache_key`` (params sections + content hashes of inputs and
code, trusted only while the outputs on disk still match), so re-running a flow skips
every stage whose inputs did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from datasetdm import orchestration
from datasetdm.config import Params


def _stage_key(stage: str) -> Callable[[Any, dict[str, Any]], str | None]:
    def key(_ctx: Any, inputs: dict[str, Any]) -> str | None:
        return orchestration.cache_key(stage, inputs["params"])

    return key


def stage_task(stage: str, retries: int = 0):
    """The task that runs ``stage`` with caching; ``retries`` where a retry can help."""

    def run(params: Params) -> dict:
        result = orchestration.run_stage(stage, params)
        # Prefect stores a result under the key computed *before* the run, which was
        # None (outputs not made yet); store it under the key the next run computes,
        # so the very next run is already a cache hit.
        key = orchestration.cache_key(stage, params)
        context = TaskRunContext.get()
        if key and context is not None:
            context.result_store.write(obj=result, key=key)
        return result

    run.__name__ = run.__qualname__ = stage.replace("-", "_")
    return task(
        run, name=stage, retries=retries, retry_delay_seconds=2, cache_key_fn=_stage_key(stage), persist_result=True
    )


real_data = stage_task("real-data")
train_decoder = stage_task("train-decoder")
expand_prompts = stage_task("expand-prompts")
# Generation resumes from the shards already on disk, so a retry after a crash (or a
# worker killed for memory) only redoes the unfinished shards.
generate = stage_task("generate", retries=2)
filter_samples = stage_task("filter")
export = stage_task("export")
# The curate stage starts FiftyOne's MongoDB; a slow first start can time out once.
curate = stage_task("curate", retries=2)
evaluate = stage_task("evaluate")
inspect_backbone = stage_task("inspect")
downstream = stage_task("downstream")
report = stage_task("report")


@task(name="plan-shards")
def plan_shards(params: Params) -> int:
    return orchestration.plan_shards(params)


@task(name="generate-shard", retries=2, retry_delay_seconds=2)
def generate_shard(params: Params, k: int) -> dict:
    return orchestration.make_shard(params, k)


@task(name="write-manifest")
def write_manifest(params: Params, entries: list[dict], fingerprint: str) -> dict:
    return orchestration.finish_generate(params, entries, fingerprint)


@task(name="publish-report")
def publish_report(params: Params, summary: dict) -> str:
    """The run report and metrics as a markdown artifact on the flow run."""
    markdown = orchestration.run_artifact(params, summary)
    create_markdown_artifact(markdown=markdown, key="factory-report", description="datasetdm run report and metrics")
    return markdown
