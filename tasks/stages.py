"""Prefect tasks: each factory stage, wrapped as it is in ``datasetdm.stages``.

No logic lives here; a task is the library function plus a name Prefect shows.
"""

from __future__ import annotations

from prefect import task

from datasetdm import stages

real_data = task(stages.make_real_sets, name="real-data")
train_decoder = task(stages.train_decoder_stage, name="train-decoder")
expand_prompts = task(stages.expand_prompts_stage, name="expand-prompts")
generate = task(stages.generate_stage, name="generate")
filter_samples = task(stages.filter_stage, name="filter")
export = task(stages.export_stage, name="export")
evaluate = task(stages.evaluate_stage, name="evaluate")
report = task(stages.report_stage, name="report")
