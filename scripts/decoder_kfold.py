"""Choose P-Decoder settings by k-fold validation over the K labelled images alone.

The held-out real set scores the decoder (``evaluate`` stage) and must never choose its
settings, so this script splits the K labelled images into folds: each fold's decoder
trains on the other K - K/folds images and is scored, with the ``evaluate`` stage's own
code, on the images it did not see. Each setting is a list of ``decoder.<key>=<value>``
overrides of ``params.yaml``; the figures are means over folds.

    python scripts/decoder_kfold.py --folds 4 --out metrics/decoder_kfold.json \
        base steps=1200 "steps=1200 channels=96"

Writes one JSON object: setting -> {semantic_mIoU, per-class IoU (both also with the decoder's
own classes: ``decoder.class_source``), instance AP, depth AbsRel, keypoint AP, seconds}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from datasetdm.config import load_params
from datasetdm.decoder.train import bank_of_images, feature_bank, fit_decoder
from datasetdm.evaluate.semantic import evaluate_decoder
from datasetdm.io import write_json
from datasetdm.realset import load_real_set, real_set_split_dirs
from datasetdm.rounds import kfold_split
from datasetdm.stages import load_backbone


def parse_setting(text: str, decoder_cfg):
    """'steps=1200 channels=96' -> a DecoderConfig with those fields replaced ('base': none)."""
    if text == "base":
        return decoder_cfg
    changes = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if not hasattr(decoder_cfg, key) or not value:
            raise SystemExit(f"error: setting {item!r}: expected decoder.<key>=<value>, e.g. steps=1200")
        current = getattr(decoder_cfg, key)
        changes[key] = type(current)(float(value)) if isinstance(current, (int, float)) else value
    return dataclasses.replace(decoder_cfg, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out", default="metrics/decoder_kfold.json")
    args = ap.parse_args()

    params = load_params()
    backbone = load_backbone(params)
    train_dir, _ = real_set_split_dirs(params.real.dir)  # the K labelled images only
    labelled = load_real_set(train_dir, params.world.classes)
    results = {}
    # (views, rotated object depth) -> the feature bank of all K images (a fold takes its images' rows)
    banks: dict[tuple[int, bool], tuple] = {}
    for text in args.settings:
        cfg = parse_setting(text, params.decoder)
        start = time.perf_counter()
        key = (cfg.views, cfg.rotated_object_depth)
        if key not in banks:
            banks[key] = feature_bank(
                backbone,
                labelled,
                params.backbone,
                params.world.classes,
                views=cfg.views,
                rotated_objects=cfg.rotated_object_depth,
            )
        folds = []
        for f in range(args.folds):
            seen, judged = kfold_split(labelled, args.folds, f)
            images = [i for i in range(len(labelled)) if i % args.folds != f]  # kfold_split's ``seen``, as indices
            bank = bank_of_images(banks[key], images, views=cfg.views)
            decoder, _ = fit_decoder(bank, params.world.classes, cfg=cfg, num_images=len(seen))
            scored = evaluate_decoder(backbone, decoder, judged, params.backbone, min_score=params.filter.min_score)
            folds.append(scored)
        iou = {c: _mean([m["semantic"]["per_class_iou"][c] for m in folds]) for c in params.world.classes}
        own = {c: _mean([m["semantic_decoder_classes"]["per_class_iou"][c] for m in folds]) for c in iou}
        results[text] = {
            "semantic_mIoU": _mean([m["semantic"]["mIoU"] for m in folds]),
            "iou": iou,
            # the same folds' labels with the named class from the decoder's own argmax (decoder.class_source)
            "semantic_mIoU_decoder_classes": _mean([m["semantic_decoder_classes"]["mIoU"] for m in folds]),
            "iou_decoder_classes": own,
            "instance_AP": _mean([m["instances"]["AP"] for m in folds]),
            "depth_AbsRel": _mean([m["depth"]["abs_rel"] for m in folds if "depth" in m]),
            "keypoint_AP": _mean([m["keypoints"]["AP"] for m in folds if "keypoints" in m]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(text, json.dumps(results[text]), flush=True)
    write_json(args.out, {"folds": args.folds, "num_labelled": len(labelled), "settings": results})


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


if __name__ == "__main__":
    main()
