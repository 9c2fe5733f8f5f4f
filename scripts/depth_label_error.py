"""Where the generated depth labels go wrong: the P-Decoder's depth head on background and on objects.

The uplift table's depth row is held back by the synthetic depth maps, which come from the
decoder's depth head. This script asks what kind of error that is, on a **validation set
rendered from its own seed range** (4,000,000+, as the label-cleaning rules were chosen;
never the held-out test set):

* AbsRel of the depth labels generation stores (``PDecoder.depth_labels``, on the
  decoder's cleaned class ids) over all pixels, over background pixels and over object
  pixels, and of the depth head's own output on the background (``head_background``:
  what ``decoder.depth_background_prior`` replaces);
* AbsRel after smoothing each labelled segment (objects: their median log depth, the
  background: a least-squares plane in log depth), with the decoder's own labels and with
  the true ones. Noise within a segment is what smoothing removes; what stays is the
  level of whole segments, which more labels of the same kind cannot fix.

    python scripts/depth_label_error.py --num 100 --out metrics/depth_labels.json
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from scipy import ndimage

from datasetdm import stages
from datasetdm.config import load_params
from datasetdm.decoder.inputs import class_attention, named_class_mask, restrict_logits, semantic_labels
from datasetdm.decoder.train import images_tensor
from datasetdm.evaluate.depth import DepthMetrics
from datasetdm.filtering import EIGHT_CONNECTED, clean_labels
from datasetdm.io import write_json
from datasetdm.realset import load_real_set, write_real_set

VALIDATION_SEED = 4_000_000


def smooth_by_segment(depth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each 8-connected piece of an object class: its median log depth; of the background: a plane."""
    log_depth = np.log(np.maximum(depth, 1e-3))
    out = log_depth.copy()
    for k in np.unique(labels):
        pieces, n = ndimage.label(labels == k, structure=EIGHT_CONNECTED)
        for j in range(1, n + 1):
            piece = pieces == j
            ys, xs = np.nonzero(piece)
            if k == 0 and len(ys) >= 12:
                design = np.stack([np.ones_like(xs), xs, ys], 1).astype(np.float64)
                coef, *_ = np.linalg.lstsq(design, log_depth[piece], rcond=None)
                out[piece] = design @ coef
            else:
                out[piece] = np.median(log_depth[piece])
    return np.exp(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--out", default="metrics/depth_labels.json")
    args = parser.parse_args()
    params = load_params("params.yaml")
    classes = tuple(params.world.classes)
    with tempfile.TemporaryDirectory() as tmp:
        write_real_set(params.world, f"{tmp}/validation", args.num, VALIDATION_SEED)
        images = load_real_set(f"{tmp}/validation", classes)
    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    kinds = ("all", "background", "objects", "head_background", "smoothed_decoder_labels", "smoothed_true_labels")
    metrics = {k: DepthMetrics() for k in kinds}
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        pixels = images_tensor([x.image for x in chunk])
        feats = backbone.extract_features(
            pixels, [x.caption for x in chunk], params.backbone.feature_timestep, [10**9 + x.id for x in chunk]
        )
        attention = class_attention(feats, backbone, classes)
        with torch.no_grad():
            out = decoder(feats.maps, attention, pixels)
        named = named_class_mask(feats.prompts, backbone, classes)
        labels = semantic_labels(
            restrict_logits(out["semantic"], named).softmax(1), attention, named, decoder.class_source
        )
        cleaned = torch.from_numpy(np.stack([clean_labels(p) for p in labels.to(torch.uint8).cpu().numpy()]))
        stored = decoder.depth_labels(out["depth"].exp(), cleaned)  # as generation writes them
        for depth, head, predicted, x in zip(stored.numpy(), out["depth"].exp().numpy(), cleaned.numpy(), chunk):
            background = x.semantic == 0
            metrics["all"].update(depth, x.depth)
            metrics["head_background"].update(head, np.where(background, x.depth, 0))
            metrics["background"].update(depth, np.where(background, x.depth, 0))
            metrics["objects"].update(depth, np.where(background, 0, x.depth))
            metrics["smoothed_decoder_labels"].update(smooth_by_segment(depth, predicted), x.depth)
            metrics["smoothed_true_labels"].update(smooth_by_segment(depth, x.semantic), x.depth)
    result = {
        "validation_set": {"num": args.num, "seed": VALIDATION_SEED},
        **{k: {**m.result(), "pixels": m.count} for k, m in metrics.items()},
    }
    write_json(args.out, result)
    for k in kinds:
        print(f"{k:24s} AbsRel {result[k]['abs_rel']:.4f}  pixels {result[k]['pixels']}")


if __name__ == "__main__":
    main()
