"""Keypoints as class-agnostic heatmaps, and back to COCO keypoints per instance.

A shape's corners have no identity of their own: a square turned by 90 degrees is
the same square, so "corner1" is only defined up to where one starts counting. A
head that had to say *which* corner is corner1 would be asked to learn an arbitrary
convention. So the decoder (and the downstream keypoint net) predict two heatmaps,
``centre`` and ``corner`` (every non-centre keypoint: corners, star tips, a circle's
compass points), and this module turns peaks back into COCO keypoints: each instance
mask takes the best centre peak and its class's number of the corner peaks that fit
it (``group_keypoints``), ordered clockwise from 12 o'clock, the world's own order (``worlds/shapes.py``).
The evaluation (``evaluate/keypoints.py``) then scores a prediction by the best
cyclic shift of its corners, the same symmetry seen from the other side.

Coordinates are COCO's: x, y in pixels, pixel (i, j) centred at x = i, y = j.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from datasetdm.worlds.shapes import KEYPOINT_NAMES

CHANNELS = ("centre", "corner")
SIGMA = 1.0  # px, the Gaussian of a heatmap target
PEAK_THRESHOLD = 0.2  # a heatmap probability below this is not a keypoint (fixed, not tuned on test data)
REACH = 2  # px: a centre may lie this far outside its instance mask (masks are not exact)
RADIUS_TOLERANCE = 0.35  # a corner lies within 35% of its instance's radius from the centre


def render_heatmaps(keypoints: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """(2, H, W) float32 targets in [0, 1]: a Gaussian per labelled keypoint (v > 0), max-combined.

    ``keypoints``: one (K, 3) array per instance, x, y, v; the first row is the centre.
    The peak sits on the nearest pixel and is exactly 1 there (the focal loss needs it).
    """
    h, w = size
    out = np.zeros((2, h, w), dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for kps in keypoints:
        for k, (x, y, v) in enumerate(np.asarray(kps, dtype=np.float32).reshape(-1, 3)):
            if v <= 0:
                continue
            xi, yi = int(round(float(x))), int(round(float(y)))
            if not (0 <= xi < w and 0 <= yi < h):
                continue
            g = np.exp(-((xs - xi) ** 2 + (ys - yi) ** 2) / (2 * SIGMA**2))
            channel = 0 if k == 0 else 1
            np.maximum(out[channel], g, out=out[channel])
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss: peaks are a handful of pixels among thousands,
    and pixels near a peak are punished less for firing (they are nearly right)."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target >= 0.999
    pos_loss = ((1 - p) ** 2 * p.log())[pos].sum()
    neg_loss = ((1 - target) ** 4 * p**2 * (1 - p).log())[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1)


def find_peaks(heat: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[np.ndarray]:
    """Per channel of ``heat`` (2, H, W) probabilities: (N, 3) float32 peaks x, y, score.

    A peak is a local 3x3 maximum above ``threshold``; its position is refined to the
    heat-weighted centroid of its 3x3 neighbourhood (the targets are Gaussians, so this
    recovers sub-pixel positions).
    """
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None]
    is_max = (F.max_pool2d(t, 3, stride=1, padding=1) == t)[0].numpy() & (heat >= threshold)
    padded = np.pad(heat, ((0, 0), (1, 1), (1, 1)))
    out = []
    for c in range(heat.shape[0]):
        ys, xs = np.nonzero(is_max[c])
        peaks = []
        for y, x in zip(ys, xs):
            win = padded[c, y : y + 3, x : x + 3]
            total = float(win.sum())
            dy = float((win.sum(1) * np.array([-1, 0, 1])).sum()) / total
            dx = float((win.sum(0) * np.array([-1, 0, 1])).sum()) / total
            peaks.append((x + dx, y + dy, float(heat[c, y, x])))
        peaks.sort(key=lambda p: -p[2])
        out.append(np.array(peaks, dtype=np.float32).reshape(-1, 3))
    return out


def group_keypoints(
    instances: list[tuple[str, np.ndarray]], peaks: list[np.ndarray]
) -> list[tuple[np.ndarray, float]]:
    """COCO keypoints (K, 3) and a score for each (shape, bool mask) instance of one image.

    Centre: the strongest centre peak within ``REACH`` px of the mask, else the mask's
    centroid (v = 1: a guess). Corners: every corner peak goes to the one instance it
    fits best, by misfit = (|distance to the centre - radius| + distance to the mask) /
    radius, the radius being the farthest mask pixel from the centre; a peak whose best
    misfit exceeds ``RADIUS_TOLERANCE`` goes nowhere. Corners of touching objects lie
    inside or beside each other's masks, so neither term decides alone. An instance
    keeps its strongest corners, as many as its shape has, ordered clockwise from
    12 o'clock about the centre; missing ones are v = 0 at the centre. The score is
    the mean peak strength over all K points (0 for a missing one).

    With exact heatmaps and masks this grouping scores keypoint AP 0.79 (60 scenes;
    occluded and coinciding corners are what it misses): the ceiling for any heatmap
    it is given.
    """
    centres, corners = peaks
    shape_hw = instances[0][1].shape if instances else (0, 0)
    centre_px = _pixels(centres, shape_hw)
    out, strengths, radii = [], [], []
    for shape, mask in instances:
        kps = np.zeros((len(KEYPOINT_NAMES[shape]), 3), dtype=np.float32)
        strength = np.zeros(len(kps), dtype=np.float32)
        inside = centres[ndimage.binary_dilation(mask, iterations=REACH)[centre_px]]
        ys, xs = np.nonzero(mask)
        if len(inside):
            kps[0] = (inside[0, 0], inside[0, 1], 2)
            strength[0] = inside[0, 2]
        else:
            kps[0] = (xs.mean() if len(xs) else 0, ys.mean() if len(ys) else 0, 1)
        radii.append(float(np.hypot(xs - kps[0, 0], ys - kps[0, 1]).max()) + 0.5 if len(xs) else 1.0)
        out.append(kps)
        strengths.append(strength)
    owner = np.full(len(corners), -1)
    if len(instances) and len(corners):
        cx = np.array([k[0, 0] for k in out])
        cy = np.array([k[0, 1] for k in out])
        r = np.array(radii)
        d = np.hypot(corners[:, None, 0] - cx[None], corners[:, None, 1] - cy[None])
        corner_px = _pixels(corners, shape_hw)
        off_mask = np.stack([ndimage.distance_transform_edt(~mask)[corner_px] for _, mask in instances], 1)
        misfit = (np.abs(d - r[None]) + off_mask) / r[None]
        best = misfit.argmin(1)
        owner = np.where(misfit[np.arange(len(corners)), best] <= RADIUS_TOLERANCE, best, -1)
    result = []
    for i, (kps, strength) in enumerate(zip(out, strengths)):
        chosen = corners[owner == i][: len(kps) - 1]  # peaks come strongest first
        if len(chosen):
            angle = np.mod(np.arctan2(chosen[:, 0] - kps[0, 0], -(chosen[:, 1] - kps[0, 1])), 2 * math.pi)
            chosen = chosen[np.argsort(angle, kind="stable")]
            kps[1 : 1 + len(chosen)] = np.column_stack([chosen[:, :2], np.full(len(chosen), 2, np.float32)])
            strength[1 : 1 + len(chosen)] = chosen[:, 2]
        kps[1 + len(chosen) :] = (kps[0, 0], kps[0, 1], 0)
        result.append((kps, float(strength.mean())))
    return result


def _pixels(points: np.ndarray, shape_hw: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (rows, columns) of the pixels nearest (N, >= 2) x, y points, clipped to the image."""
    h, w = shape_hw
    return (
        np.clip(np.round(points[:, 1]).astype(int), 0, h - 1),
        np.clip(np.round(points[:, 0]).astype(int), 0, w - 1),
    )


def predict_keypoints(
    instances: list[tuple[int, np.ndarray, float]], heat: np.ndarray, classes: tuple[str, ...]
) -> list[tuple[int, np.ndarray, float]]:
    """(category id, (K, 3) keypoints, score) for each (category id, mask, score) instance, from heatmaps (2, H, W).

    The score multiplies the instance's mask score by its keypoints' peak strength, so
    COCOeval ranks confident objects with clear keypoints first.
    """
    grouped = group_keypoints([(classes[k - 1], mask) for k, mask, _ in instances], find_peaks(heat))
    return [(k, kps, score * strength) for (k, _, score), (kps, strength) in zip(instances, grouped)]


def gt_keypoints(
    instance_masks: np.ndarray, instance_classes: list[str], keypoints: list[np.ndarray]
) -> list[tuple[str, np.ndarray, float, list[float]]]:
    """A labelled image's instances as ``KeypointAP.update`` wants them: (class, keypoints, area, bbox)."""
    out = []
    for mask, name, kps in zip(instance_masks, instance_classes, keypoints):
        ys, xs = np.nonzero(mask)
        if not len(xs):
            continue
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        out.append((name, kps, float(len(xs)), bbox))
    return out
