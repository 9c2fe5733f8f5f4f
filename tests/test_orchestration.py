"""Stage fingerprints and cache keys: what lets a Prefect re-run skip finished work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from datasetdm import orchestration
from datasetdm.stages import STAGES


def test_every_stage_is_described():
    assert set(STAGES) <= set(orchestration.STAGE_IO)


def test_cache_key_follows_params_inputs_and_outputs(tiny_params):
    p = tiny_params
    assert orchestration.cache_key("expand-prompts", p) is None  # never ran
    orchestration.run_stage("expand-prompts", p)
    key = orchestration.cache_key("expand-prompts", p)
    assert key and key.startswith("expand-prompts-")
    assert orchestration.cache_key("expand-prompts", p) == key  # stable

    other = dataclasses.replace(p, prompts=dataclasses.replace(p.prompts, num_prompts=5))
    assert orchestration.cache_key("expand-prompts", other) is None  # params changed: outputs are not for these
    # A section the stage does not read leaves the key alone.
    unrelated = dataclasses.replace(p, filter=dataclasses.replace(p.filter, min_score=0.9))
    assert orchestration.cache_key("expand-prompts", unrelated) == key

    out = Path(p.prompts.out)
    out.write_text(out.read_text() + " ")  # output edited by hand
    assert orchestration.cache_key("expand-prompts", p) is None
    out.unlink()
    assert orchestration.cache_key("expand-prompts", p) is None


def test_input_change_invalidates_downstream(tiny_params):
    p = tiny_params
    orchestration.run_stage("real-data", p)
    orchestration.run_stage("train-decoder", p)
    key = orchestration.cache_key("train-decoder", p)
    assert key
    label = next(Path(p.real.dir, "train").rglob("*.png"))
    label.write_bytes(label.read_bytes() + b"\0")  # an input file changed
    assert orchestration.cache_key("train-decoder", p) is None
