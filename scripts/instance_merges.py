"""How often do touching objects of one class merge into one instance, even with exact labels?

The factory (``export/coco.py``) and the downstream models make instances as 8-connected
pieces of each class, so two touching objects of one class become one instance, and one
depth level per segment (the size cue) cannot fit both. This script measures that cap on
scenes **rendered from the validation seed range** (4,000,000+, as ``depth_label_error.py``;
never the held-out test set) with their exact labels, so no decoder error is in it:

* the share of objects (and of object pixels) that sit in a piece holding more than one object;
* the share of scenes with such a piece;
* AbsRel on a merged piece's pixels when the piece gets one level (its median depth).

    python scripts/instance_merges.py --num 1000 --out metrics/instance_merges.json
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from datasetdm.config import load_params
from datasetdm.filtering import EIGHT_CONNECTED
from datasetdm.io import write_json
from datasetdm.worlds.shapes import render_scene

VALIDATION_SEED = 4_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--num", type=int, default=1000, help="validation scenes")
    parser.add_argument("--out", default="metrics/instance_merges.json")
    args = parser.parse_args()

    world = load_params(args.params).world
    objects = merged = object_pixels = merged_pixels = scenes_with_merge = 0
    merged_abs_rel: list[float] = []
    for s in tqdm(range(args.num), desc="validation scenes", unit="scene", mininterval=2):
        scene = render_scene(world, VALIDATION_SEED + s)
        found = False
        for k in np.unique(scene.semantic)[1:]:  # object classes (0 is background)
            pieces, n = ndimage.label(scene.semantic == k, structure=EIGHT_CONNECTED)
            for j in range(1, n + 1):
                piece = pieces == j
                owners, size = int((scene.instances & piece).any(axis=(1, 2)).sum()), int(piece.sum())
                objects += owners
                object_pixels += size
                if owners > 1:
                    found = True
                    merged += owners
                    merged_pixels += size
                    depth = scene.depth[piece]
                    level = np.exp(np.median(np.log(depth)))
                    merged_abs_rel.append(float(np.mean(np.abs(level - depth) / depth)))
        scenes_with_merge += found
    result = {
        "validation_seed": VALIDATION_SEED,
        "scenes": args.num,
        "objects": objects,
        "objects_in_merged_pieces": merged / objects,
        "object_pixels_in_merged_pieces": merged_pixels / object_pixels,
        "scenes_with_a_merged_piece": scenes_with_merge / args.num,
        "merged_piece_abs_rel_one_level": float(np.mean(merged_abs_rel)) if merged_abs_rel else None,
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
