"""Generation scaled out: the plan's shards mapped as Prefect tasks over Dask workers.

``generate_sharded(params_path, workers=2)`` starts a local Dask cluster (one process
per worker, one thread each); ``address="tcp://host:8786"`` uses a running cluster
instead. Every shard is a function of the params alone, so the result is
byte-identical to ``python -m datasetdm generate`` whatever the number of workers.
"""

from __future__ import annotations

import sys

from prefect import flow, unmapped
from prefect_dask import DaskTaskRunner

from datasetdm import orchestration
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
    fp = orchestration.fingerprint("generate", params)
    n = stages.plan_shards(params)
    entries = stages.generate_shard.map(unmapped(params), range(n))
    return stages.write_manifest(params, [e.result() for e in entries], fp)


def generate_sharded(params_path: str = "params.yaml", workers: int = 2, address: str | None = None) -> dict:
    return _generate_sharded.with_options(task_runner=dask_runner(workers, address))(params_path)


if __name__ == "__main__":
    print(
        generate_sharded(
            sys.argv[1] if len(sys.argv) > 1 else "params.yaml", workers=int(sys.argv[2]) if len(sys.argv) > 2 else 2
        )
    )
