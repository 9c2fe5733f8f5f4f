"""The factory flow: every stage of ``dvc.yaml`` brought up to date, in DVC's order.

Run it in-process with ``python -m flows.factory`` (Prefect starts a temporary local
server) or as the ``factory/default`` deployment (``prefect.yaml``). The stages and
their order come from DVC's graph and each task runs ``dvc repro --single-item``, so a
stage DVC finds up to date is skipped and ``dvc.lock`` records whatever ran, exactly as
after ``make run``. ``set_params`` (``key.path=value``, as ``dvc exp run -S``) edits
``params.yaml`` before the run and is recorded in the run's artifact. The run ends with
a markdown artifact holding what each stage did, the report and the metrics. Every
flow holds the workspace lock (``datasetdm/workspace_lock.py``) for its whole run, so
no ``make run`` or other flow can start between two of its stages.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from prefect import flow
from prefect.runtime import flow_run

from datasetdm import dvc_pipeline
from datasetdm.config import load_params
from datasetdm.orchestration import headline_metrics
from datasetdm.workspace_lock import Holder, hold_workspace
from flows.generate import bring_generation_up_to_date
from tasks import stages

# Prefect hands the library's loggers its handlers (PREFECT_LOGGING_EXTRA_LOGGERS=datasetdm)
# but not a level; at INFO their decisions and DVC's output reach the flow-run logs.
logging.getLogger("datasetdm").setLevel(logging.INFO)

# What `make run` reproduces (`dvc repro curate report`): every stage but the uplift ones, `rounds`, `steering`.
FACTORY_TARGETS = ["curate", "report"]


def hold() -> contextlib.AbstractContextManager[Holder]:
    """Inside a flow, in the project directory: the workspace lock, named after the flow run."""
    return hold_workspace(".", command=f"prefect flow run {flow_run.flow_name}/{flow_run.name}")


def run_stages(targets: list[str], set_params: list[str] | None, workers: int = 1, address: str | None = None) -> dict:
    """Inside a flow: apply the overrides, then bring ``targets`` and what they need up to date."""
    overrides = stages.apply_params(set_params) if set_params else {}
    runs = {}
    for stage in dvc_pipeline.stage_order(".", targets):
        if stage == "generate" and (workers > 1 or address):
            runs[stage] = bring_generation_up_to_date(workers=workers, address=address)
        else:
            runs[stage] = stages.repro(stage)
    return {"set_params": overrides, "stages": runs}


@flow(name="factory", log_prints=True)
def factory(
    project_dir: str = ".",
    targets: list[str] | None = None,
    set_params: list[str] | None = None,
    workers: int = 1,
    address: str | None = None,
    rounds: int = 0,
    budget: int | None = None,
) -> dict:
    """``targets``: DVC stages to reach (default: the whole factory, as ``make run``);
    ``workers`` > 1 or a Dask scheduler ``address`` maps generation's shards over Dask;
    ``rounds`` > 0 then makes that many regeneration rounds of ``budget`` samples each
    (default ``steer.budget``), each one DVC experiment (the nightly deployment: 1)."""
    with contextlib.chdir(project_dir), hold():
        summary = run_stages(targets or FACTORY_TARGETS, set_params, workers=workers, address=address)
        summary["rounds"] = [stages.regeneration_round(budget) for _ in range(rounds)]
        params = load_params()
        summary.update(headline_metrics(params))
        stages.publish_report(params, summary)
    ran = [s for s, r in summary["stages"].items() if r["ran"]]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}")
    for made in summary["rounds"]:
        print(f"regeneration round {made['round']}: experiment {made['experiment']}, held-out {made['last']}")
    return summary


if __name__ == "__main__":
    factory(sys.argv[1] if len(sys.argv) > 1 else ".")
