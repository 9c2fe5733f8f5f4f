"""Generation scaled out: the plan's shards mapped as Prefect tasks over Dask workers.

DVC still decides whether generation is stale; when it is, the shards are mapped over
a local Dask cluster (one process per worker, one thread each) or a running one
(``address="tcp://host:8786"``), the manifest is written once all are done, and
``dvc commit`` records the stage in ``dvc.lock``. Every shard is a function of the
params alone, so the result is byte-identical to ``dvc repro generate`` whatever the
number of workers.
"""

from __future__ import annotations

import contextlib
import sys
import time

from prefect import flow, unmapped
from prefect_dask import DaskTaskRunner

from datasetdm.config import load_params
from tasks import stages


def dask_runner(workers: int = 2, address: str | None = None) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    # One torch thread per worker process: workers share the machine's cores.
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "host": "127.0.0.1",
            "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        }
    )


@flow(name="generate-sharded", log_prints=True)
def _generate_sharded(params_path: str) -> dict:
    params = load_params(params_path)
    n = stages.plan_shards(params)
    entries = stages.generate_shard.map(unmapped(params), range(n))
    return stages.write_manifest(params, [e.result() for e in entries])


def generate_sharded(params_path: str = "params.yaml", workers: int = 2, address: str | None = None) -> dict:
    """The shard map alone, for the generation a params file describes (no DVC bookkeeping)."""
    return _generate_sharded.with_options(task_runner=dask_runner(workers, address))(params_path)


def bring_generation_up_to_date(workers: int = 2, address: str | None = None) -> dict:
    """Inside a flow, in the project directory: the generate stage through the Dask shard map."""
    start = time.monotonic()
    if not stages.is_stale("generate"):
        return {"stage": "generate", "ran": False, "seconds": time.monotonic() - start}
    generate_sharded("params.yaml", workers=workers, address=address)
    stages.commit_stage("generate")
    return {"stage": "generate", "ran": True, "seconds": time.monotonic() - start}


@flow(name="generate", log_prints=True)
def generate(project_dir: str = ".", workers: int = 1, address: str | None = None) -> dict:
    """The generate stage (and what it needs); ``workers`` > 1 or ``address``: shards over Dask."""
    from flows.factory import hold, run_stages

    with contextlib.chdir(project_dir), hold():
        return run_stages(["generate"], None, workers=workers, address=address)


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else ".", workers=int(sys.argv[2]) if len(sys.argv) > 2 else 2))
