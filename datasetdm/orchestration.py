"""What an orchestrator needs to know about a stage: its settings, inputs and outputs.

The Prefect tasks cache a stage on a *fingerprint*: the sha256 of the params sections
the stage reads plus the content hashes of the files it reads (data and the library
code it runs), mirroring the stage's entry in ``dvc.yaml``. After a stage succeeds,
``run_stage`` records the fingerprint and the hashes of the outputs in a stamp file
beside the first output; a cached result is only trusted while the outputs on disk
still match that stamp, so deleting or overwriting an output makes the stage run
again, just as ``dvc repro`` would.

Nothing here imports Prefect: the tasks in ``tasks/`` are thin wrappers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasetdm import stages
from datasetdm.config import Params
from datasetdm.io import sha256_dir, sha256_file, write_json

PACKAGE = Path(__file__).resolve().parent
STAMPS = ".datasetdm-stamps"


@dataclass(frozen=True)
class StageIO:
    """One stage as an orchestrator sees it (the same facts as its ``dvc.yaml`` entry).

    params: dotted params keys it reads. deps/outs: paths, given the params. code:
    library files or folders (relative to the package) whose change must rerun it.
    """

    params: tuple[str, ...]
    deps: Callable[[Params], list[str]]
    outs: Callable[[Params], list[str]]
    code: tuple[str, ...]


STAGE_IO: dict[str, StageIO] = {
    "real-data": StageIO(
        ("world", "real", "evaluate.unseen_classes", "evaluate.num_zero_shot", "evaluate.zero_shot_seed"),
        lambda p: [],
        lambda p: [p.real.dir],
        ("worlds", "realset.py"),
    ),
    "train-decoder": StageIO(
        ("world.classes", "backbone", "decoder"),
        lambda p: [f"{p.real.dir}/train", p.backbone.model],
        lambda p: [p.decoder.out],
        ("backbones", "capture.py", "decoder"),
    ),
    "expand-prompts": StageIO(("world", "prompts"), lambda p: [], lambda p: [p.prompts.out], ("prompts.py",)),
    "generate": StageIO(
        ("backbone", "generate"),
        lambda p: [p.prompts.out, p.decoder.out, p.backbone.model],
        lambda p: [p.generate.out],
        ("generate.py", "filtering.py"),
    ),
    "filter": StageIO(("filter",), lambda p: [p.generate.out], lambda p: [p.filter.out], ("filtering.py",)),
    "export": StageIO(
        ("world", "real", "backbone", "decoder", "prompts", "generate", "filter", "export"),
        lambda p: [p.generate.out, p.filter.out],
        lambda p: [p.export.out],
        ("export",),
    ),
    "curate": StageIO(("curate",), lambda p: [p.export.out], lambda p: [p.curate.out], ("curate.py",)),
    "evaluate": StageIO(
        ("backbone", "filter.min_score", "evaluate", "world.classes"),
        lambda p: [f"{p.real.dir}/train", f"{p.real.dir}/test", f"{p.real.dir}/zero-shot", p.decoder.out],
        lambda p: [p.evaluate.out],
        ("evaluate", "filtering.py"),
    ),
    "inspect": StageIO(
        ("world", "backbone", "inspect"),
        lambda p: [p.inspect.model, p.export.out, f"{p.real.dir}/test", p.backbone.model],
        lambda p: [p.inspect.out, p.inspect.grid],
        ("evaluate/inspector.py", "evaluate/backbone.py"),
    ),
    "downstream": StageIO(
        ("world.classes", "downstream"),
        lambda p: [f"{p.real.dir}/train", f"{p.real.dir}/test", p.export.out],
        lambda p: [p.downstream.out, p.downstream.plot],
        ("downstream",),
    ),
    "uplift": StageIO(
        ("world", "real", "downstream"),
        lambda p: [f"{p.real.dir}/train", f"{p.real.dir}/test", p.export.out],
        lambda p: [p.downstream.uplift_out],
        ("downstream",),
    ),
    "report": StageIO(
        ("report",),
        lambda p: [p.export.out, p.evaluate.out, p.downstream.out, p.inspect.out],
        lambda p: [p.report.out],
        ("report.py",),
    ),
}


def path_hash(path: str | Path) -> str | None:
    """sha256 of a file or a folder's files; ``None`` when the path does not exist."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sha256_dir(path)
    return None


def code_hash(path: Path) -> str | None:
    """sha256 of a module or a package's ``.py`` files (bytecode caches change on import)."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.py")):
        h.update(f"{f.relative_to(path)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _param(params: Params, dotted: str) -> Any:
    value: Any = params.to_dict()
    for part in dotted.split("."):
        value = value[part]
    return value


def fingerprint(stage: str, params: Params) -> str:
    """sha256 over the stage's params sections and the contents of everything it reads."""
    io = STAGE_IO[stage]
    payload = {
        "stage": stage,
        "params": {k: _param(params, k) for k in io.params},
        "deps": {d: path_hash(d) for d in io.deps(params)},
        "code": {c: code_hash(PACKAGE / c) for c in io.code},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def stamp_path(stage: str, params: Params) -> Path:
    first_out = Path(STAGE_IO[stage].outs(params)[0])
    return first_out.parent / STAMPS / f"{stage}.json"


def outputs_hash(stage: str, params: Params) -> dict[str, str | None]:
    return {o: path_hash(o) for o in STAGE_IO[stage].outs(params)}


def cache_key(stage: str, params: Params) -> str | None:
    """The key under which a finished run of ``stage`` may be reused, or ``None``.

    ``None`` (run it) unless the stage's stamp says its current outputs were made
    from exactly these params and inputs.
    """
    fp = fingerprint(stage, params)
    stamp = stamp_path(stage, params)
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    outs = outputs_hash(stage, params)
    if recorded.get("fingerprint") != fp or recorded.get("outs") != outs or None in outs.values():
        return None
    return f"{stage}-{fp}"


def run_stage(stage: str, params: Params) -> dict:
    """Run one stage and stamp its outputs with the fingerprint of what it read."""
    fp = fingerprint(stage, params)  # before running: the inputs the outputs come from
    result = stages.STAGES[stage](params)
    write_json(stamp_path(stage, params), {"stage": stage, "fingerprint": fp, "outs": outputs_hash(stage, params)})
    return result


# Sharded generation: the plan's shards are independent, so an orchestrator can map
# them over workers; the manifest and the stamp are written once all are done.


def plan_shards(params: Params) -> int:
    """Check the prompts against the models and return the number of shards to make."""
    from datasetdm.generate import check_prompts, load_prompts, shard_plan

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    prompts = load_prompts(params.prompts.out)
    check_prompts(prompts, backbone, tuple(decoder.config["classes"]), params.prompts.out)
    return len(shard_plan(prompts, params.generate))


def make_shard(params: Params, k: int) -> dict:
    """Generate shard ``k`` into ``generate.out`` (reused if complete); its manifest entry."""
    from datasetdm.generate import generate_shard, load_prompts

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    return generate_shard(
        backbone, decoder, load_prompts(params.prompts.out), params.generate, params.backbone, params.generate.out, k
    )


def finish_generate(params: Params, entries: list[dict], fp: str) -> dict:
    """Write the manifest over the shard entries and stamp the generate stage with ``fp``."""
    from datasetdm.generate import generation_provenance, write_manifest

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    manifest = write_manifest(
        params.generate.out,
        entries,
        tuple(decoder.config["classes"]),
        backbone.image_size,
        generation_provenance(backbone, decoder, params.backbone),
    )
    write_json(
        stamp_path("generate", params),
        {"stage": "generate", "fingerprint": fp, "outs": outputs_hash("generate", params)},
    )
    return {"num_samples": manifest["num_samples"], "shards": len(manifest["shards"])}


def run_artifact(params: Params, summary: dict) -> str:
    """Markdown for the flow run's artifact: stage results, metrics, the report, plots."""
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
