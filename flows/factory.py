"""The factory flow: few-shot decoder -> prompts -> generation -> filter -> export -> curate.

Run it in-process with ``python -m flows.factory [params.yaml]`` (Prefect starts a
temporary local server) or as the ``factory/default`` deployment (``prefect.yaml``).
``params.yaml`` is parsed once, here, and the typed ``Params`` go to every task. Each
stage task is cached on its params and input hashes, so a re-run skips finished work;
the run ends with a markdown artifact holding the report and metrics.
"""

from __future__ import annotations

import sys

from prefect import flow

from datasetdm.config import load_params
from tasks import stages


@flow(name="factory", log_prints=True)
def factory(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    real = stages.real_data(params)
    decoder = stages.train_decoder(params, wait_for=[real])
    prompts = stages.expand_prompts(params)
    generated = stages.generate(params, wait_for=[decoder, prompts])
    kept = stages.filter_samples(params, wait_for=[generated])
    exported = stages.export(params, wait_for=[kept])
    curated = stages.curate(params, wait_for=[exported])
    metrics = stages.evaluate(params, wait_for=[decoder])
    audit = stages.inspect_backbone(params, wait_for=[exported])
    uplift = stages.downstream(params, wait_for=[exported])
    stages.report(params, wait_for=[exported, metrics, audit, uplift])
    summary = {
        "real": real,
        "decoder": decoder,
        "prompts": prompts,
        "generated": generated,
        "filtered": kept,
        "exported": exported,
        "curated": curated,
        "mIoU": metrics["semantic"]["mIoU"],
        "prompt_fidelity": audit["prompt_fidelity"],
        "downstream": uplift["semantic"],
    }
    stages.publish_report(params, summary)
    print(summary)
    return summary


if __name__ == "__main__":
    factory(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
