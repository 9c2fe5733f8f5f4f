"""What the Prefect flows need beyond DVC: the generation shard map and the run artifact.

Which stages exist, their order and whether each is up to date are DVC's to say
(``datasetdm/dvc_pipeline.py`` reads ``dvc.yaml``; there is no second table here).
Generation is the one stage a flow may split further: its plan's shards are
independent, so a flow can map them over Dask workers, write the manifest once all
are done, and then record the stage in ``dvc.lock`` (``dvc_pipeline.commit_stage``).

Nothing here imports Prefect: the tasks in ``tasks/`` are thin wrappers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasetdm import stages
from datasetdm.config import Params

logger = logging.getLogger(__name__)

# Sharded generation: the plan's shards are independent, so an orchestrator can map
# them over workers; the manifest is written once all are done.


def plan_shards(params: Params) -> int:
    """Check the prompts against the models and return the number of shards to make."""
    from datasetdm.generate import check_prompts, load_prompts, remove_changed_shards, shard_plan

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    prompts = load_prompts(params.prompts.out)
    check_prompts(prompts, backbone, tuple(decoder.config["classes"]), params.prompts.out)
    if Path(params.generate.out).is_dir():  # shards edited since the last seal are made again
        remove_changed_shards(Path(params.generate.out))
    n = len(shard_plan(prompts, params.generate))
    logger.info("generation: %d samples in %d shards", params.generate.num_samples, n)
    return n


def make_shard(params: Params, k: int) -> dict:
    """Generate shard ``k`` into ``generate.out`` (reused if complete); its manifest entry."""
    from datasetdm.generate import generate_shard, load_prompts

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    return generate_shard(
        backbone,
        decoder,
        load_prompts(params.prompts.out),
        gen=params.generate,
        bb=params.backbone,
        out_dir=params.generate.out,
        k=k,
    )


def finish_generate(params: Params, entries: list[dict]) -> dict:
    """Write the manifest over the shard entries (the seal of a finished generation)."""
    from datasetdm.generate import generation_provenance, write_manifest

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    manifest = write_manifest(
        params.generate.out,
        entries,
        classes=tuple(decoder.config["classes"]),
        image_size=backbone.image_size,
        provenance=generation_provenance(backbone, decoder, params.backbone),
    )
    return {"num_samples": manifest["num_samples"], "shards": len(manifest["shards"]), "made": manifest["made"]}


def run_artifact(params: Params, summary: dict) -> str:
    """Markdown for the flow run's artifact: what each stage did, metrics, the report, plots."""
    lines = ["# datasetdm factory run", "", "| stage | result |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v, sort_keys=True)}` |" for k, v in summary.items()]
    metrics_file = Path(params.evaluate.out)
    if metrics_file.is_file():
        sem = json.loads(metrics_file.read_text()).get("semantic", {})
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sem.items() if isinstance(v, float)]
    report = Path(params.report.out)
    if report.is_file():
        lines += ["", f"## Report (`{report}`)", "", report.read_text()]
    plots = sorted((report.parent / "plots").glob("*.png")) if report.parent.is_dir() else []
    if plots:
        lines += ["", "## Plots", ""] + [f"* `{p}`" for p in plots]
    return "\n".join(lines) + "\n"


def headline_metrics(params: Params) -> dict:
    """The figures a run summary leads with, from the metrics files that exist."""

    def read(path: str) -> dict:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}

    out = {}
    if sem := read(params.evaluate.out).get("semantic"):
        out["decoder_mIoU"] = sem["mIoU"]
    if fidelity := read(params.inspect.out).get("prompt_fidelity"):
        out["prompt_fidelity"] = {k: fidelity[k] for k in ("single_object", "two_objects") if k in fidelity}
    if semantic := read(params.downstream.out).get("semantic"):
        out["downstream_semantic"] = semantic
    return out


def regeneration_round(root: str | Path, budget: int | None = None) -> dict:
    """The next regeneration round (``datasetdm.rounds``) as one DVC experiment named ``round-NNN``.

    ``steer.round`` (and ``steer.budget`` when given) are set in params.yaml, checked, and
    ``dvc exp run rounds`` makes the round and scores it; ``dvc exp show`` then lists it
    beside the rounds before it with its metrics.
    """
    from datasetdm import dvc_pipeline
    from datasetdm.config import load_params
    from datasetdm.rounds import next_round

    params = load_params(Path(root) / dvc_pipeline.PARAMS_FILE)
    r = next_round(params)
    overrides = [f"steer.round={r}", *([f"steer.budget={budget}"] if budget is not None else [])]
    dvc_pipeline.apply_params(root, overrides)
    name = f"round-{r:03d}"
    logger.info("regeneration round %d (%s) as DVC experiment %s", r, params.steer.mode, name)
    dvc_pipeline.run_experiment(root, "rounds", name=name)
    metrics = json.loads((Path(root) / params.steer.metrics).read_text())
    return {"round": r, "experiment": name, "last": metrics.get("last", {})}
