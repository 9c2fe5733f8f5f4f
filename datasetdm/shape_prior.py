"""Shape fidelity: does each object a mask labels have the outline its class has in the K labelled images?

The filter (``filtering.py``) scores how well a generated sample's labels agree with its
image: the decoder's confidence, the classes found, the cross-attention. It cannot see a
wrong shape that is labelled cleanly: the generator drew an ellipse for "a red triangle",
the decoder called the ellipse a triangle, and every signal agrees. Seen in a steered
round's export grid and in round 0's (ellipses labelled triangle are the commonest such
failure), so picking the filter's best of several candidates picked wrong triangles as
readily as right ones.

This is the factory's own check, learned from the K labelled images only (the same ones
the P-Decoder trains on; never the held-out set, never the inspector): every object
outline in them becomes a reference, described by numbers that do not change with
position, size or rotation (the harmonics of its radius around its centre, and its
solidity). A generated object scores by whether its nearest reference outline is of its
own class: ``d_other / (d_same + d_other)``, 1 when only its own class is near, 0.5 when
both are as near, towards 0 when another class's outline fits and its own does not. No
threshold is tuned: the score ranks candidates (``steer.shape_check``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from datasetdm.filtering import object_pieces
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)
MIN_PIXELS = 40  # outlines of fewer pixels are too coarse to tell a triangle from an ellipse
HARMONICS = 8  # radius-around-the-centre harmonics kept (the world's corners: 3, 4, 5 pointed stars)
ANGLE_BINS = 64
UNJUDGED = 0.5  # a sample with no outline to judge: the score's neutral point (5% of round 0's kept samples)


def descriptor(mask: np.ndarray) -> np.ndarray:
    """Numbers describing one object's outline, the same at any position, size and rotation.

    The object's outer radius as a function of the angle around its centroid, divided by its
    mean, has harmonics that name its corners (a triangle's third, a square's fourth, a star's
    fifth; an ellipse's second; a circle's none); their magnitudes do not change with rotation.
    Solidity (area over convex hull area) tells a star or a bow-tie from a solid shape.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    ey, ex = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    bins = ((np.arctan2(ey - cy, ex - cx) + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    radius = np.zeros(ANGLE_BINS)
    np.maximum.at(radius, bins, np.hypot(ey - cy, ex - cx))
    seen = np.nonzero(radius)[0]
    if len(seen) < ANGLE_BINS:  # small outlines leave angles with no edge pixel: interpolate round
        radius = np.interp(np.arange(ANGLE_BINS), seen, radius[seen], period=ANGLE_BINS)
    harmonics = np.abs(np.fft.rfft(radius / radius.mean()))[1 : HARMONICS + 1] / ANGLE_BINS
    return np.concatenate([harmonics, [len(ys) / _hull_area(ys, xs)]])


def _hull_area(ys: np.ndarray, xs: np.ndarray) -> float:
    """Area of the convex hull of the pixels' squares (every corner of every pixel)."""
    corners = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    try:
        return float(ConvexHull(corners).volume)
    except QhullError:  # all pixels on one line
        return float(len(ys))


def object_outlines(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, mask) of every 8-connected labelled piece that can be judged (``filtering.object_pieces``):
    at least MIN_PIXELS and clear of the image border (what lies beyond the border is unknown). The mask
    is image-sized, so the descriptor's arithmetic (centroid, angles) is in image coordinates."""
    for k, window, piece, at_border in object_pieces(labels):
        if not at_border and piece.sum() >= MIN_PIXELS:
            mask = np.zeros(labels.shape, dtype=bool)
            mask[window] = piece
            yield k, mask


@dataclass(frozen=True)
class ShapePrior:
    """Reference outlines (class ids 1.. as in semantic masks, and their descriptors)."""

    class_ids: np.ndarray  # (N,)
    descriptors: np.ndarray  # (N, HARMONICS + 1)

    @classmethod
    def from_labelled(cls, images: Sequence[LabelledImage], classes: Sequence[str]) -> ShapePrior:
        """References from the K labelled images: every whole instance and every piece of the
        semantic masks (two touching objects of one class are one piece there, as in a generated
        mask, so such pieces are references too)."""
        ids, descs = [], []
        for image in images:
            for name, mask in zip(image.instance_classes, image.instance_masks):
                for _, piece in object_outlines(mask.astype(np.uint8)):
                    ids.append(1 + list(classes).index(name))
                    descs.append(descriptor(piece))
            for k, piece in object_outlines(image.semantic):
                ids.append(k)
                descs.append(descriptor(piece))
        counts = {name: ids.count(1 + i) for i, name in enumerate(classes)}
        logger.info("shape prior: %d reference outlines from %d labelled images %s", len(ids), len(images), counts)
        return cls(np.array(ids, dtype=np.int64), np.array(descs).reshape(len(ids), HARMONICS + 1))

    def outline_fidelity(self, k: int, mask: np.ndarray) -> float | None:
        """``d_other / (d_same + d_other)`` for one outline of class k; None when the references
        lack class k or hold only class k (nothing to compare)."""
        same, other = self.class_ids == k, self.class_ids != k
        if not same.any() or not other.any():
            return None
        d = np.linalg.norm(self.descriptors - descriptor(mask), axis=1)
        d_same, d_other = d[same].min(), d[other].min()
        return float(d_other / (d_same + d_other)) if d_same + d_other > 0 else 0.5

    def fidelity(self, labels: np.ndarray) -> float:
        """A sample's shape fidelity: its worst-fitting judged outline's (one wrong object makes
        the sample wrong); ``UNJUDGED`` when no outline can be judged (every object cut by the
        border, or too small), so such a sample neither beats a well-fitting one nor loses to a
        poor one."""
        scores = [self.outline_fidelity(k, piece) for k, piece in object_outlines(labels)]
        return min((s for s in scores if s is not None), default=UNJUDGED)
