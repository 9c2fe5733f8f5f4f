"""The uplift table, DatasetDM's headline re-done on our world: (a) K real, (b) synthetic, (c) both.

One small model per task (``models.py``) is trained on each training set with the
same architecture, steps and seed, and scored on the held-out real images
(``evaluate.py``). Written as DVC metrics (one entry per task) and plot rows.
"""

from __future__ import annotations

from datasetdm.config import DownstreamConfig
from datasetdm.downstream.data import ArraySet
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import TASKS, train_model, usable
from datasetdm.realset import LabelledImage


def uplift_table(real: ArraySet, synthetic: ArraySet, test: list[LabelledImage], classes: tuple[str, ...], cfg: DownstreamConfig) -> dict:
    """The uplift table: per task and training set, the held-out metric; plus rows for the DVC plot.

    A task the synthetic set has no labels for (a decoder without that head) gets the
    real-only row and no others.
    """
    counts = {"num_real": len(real), "num_synthetic": len(synthetic), "num_test": len(test)}
    runs = {"real": [real], "synthetic": [synthetic], "real+synthetic": [real, synthetic]}
    scores: dict[str, dict[str, dict]] = {}
    for task in TASKS:
        scores[task] = {}
        for name, sources in runs.items():
            if all(usable(task, src) for src in sources):
                model = train_model(task, sources, 1 + len(classes), cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, cfg.width,
                                    desc=f"downstream {task} ({name})")
                scores[task][name] = evaluate_model(task, model, test, classes)
    # (task in the metrics file, model, metric key inside its result, name in the plot)
    table = (("semantic", "semantic", ("mIoU",), "semantic mIoU"), ("instances", "semantic", ("instances", "AP"), "instance mask AP"),
             ("depth", "depth", ("delta1",), "depth delta<1.25"), ("keypoints", "keypoints", ("AP",), "keypoint AP"))
    metrics: dict = {}
    plot = []
    for task, model_task, key, label in table:
        entry = dict(counts)
        for name, result in scores[model_task].items():
            value = result
            for k in key:
                value = value[k]
            entry[f"{key[-1]}_{name}"] = value
            plot.append({"run": f"{label} | {name}", "task": task, "training data": name, "value": round(float(value), 4)})
            if task == "depth":
                entry[f"abs_rel_{name}"] = result["abs_rel"]
        if "real+synthetic" in scores[model_task]:
            if task == "depth":
                # The target is relative: (c) has >= 30% lower AbsRel than (a).
                entry["abs_rel_reduction"] = 1 - entry["abs_rel_real+synthetic"] / entry["abs_rel_real"]
            else:
                entry["uplift"] = entry[f"{key[-1]}_real+synthetic"] - entry[f"{key[-1]}_real"]
        metrics[task] = entry
    return {"metrics": metrics, "plot": plot}
