"""Shape fidelity: outlines judged against the K labelled images' outlines, drawn here by hand."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from datasetdm.realset import LabelledImage
from datasetdm.shape_prior import UNJUDGED, ShapePrior, descriptor
from datasetdm.steering import best_per_slot

CLASSES = ("circle", "triangle")
CIRCLE, TRIANGLE = 1, 2


def _polygon(corners: int, radius: float, angle: float, centre=(32, 32), squash: float = 1.0) -> np.ndarray:
    image = Image.new("L", (64, 64))
    points = [
        (
            centre[0] + radius * math.cos(angle + 2 * math.pi * i / corners),
            centre[1] + squash * radius * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]
    ImageDraw.Draw(image).polygon(points, fill=1)
    return np.asarray(image).astype(bool)


def _disk(radius: float, centre=(32, 32)) -> np.ndarray:
    return _polygon(60, radius, 0.0, centre)


def _ellipse(radius: float, angle: float) -> np.ndarray:
    return _polygon(60, radius, angle, squash=0.45)


def _labelled(masks: list[np.ndarray], names: list[str]) -> LabelledImage:
    semantic = np.zeros((64, 64), dtype=np.uint8)
    for mask, name in zip(masks, names):
        semantic[mask] = 1 + CLASSES.index(name)
    return LabelledImage(
        0, "images/000000.png", np.zeros((64, 64, 3), np.uint8), "", semantic, np.stack(masks), names, None, []
    )


def _prior() -> ShapePrior:
    images = [_labelled([_disk(r)], ["circle"]) for r in (9, 13, 17)]
    images += [_labelled([_polygon(3, r, a)], ["triangle"]) for r, a in ((10, 0.2), (14, 1.3), (18, 2.0))]
    return ShapePrior.from_labelled(images, CLASSES)


def test_descriptor_ignores_position_size_and_rotation_but_not_shape():
    triangle = descriptor(_polygon(3, 12, 0.3))
    moved = descriptor(_polygon(3, 16, 1.1, centre=(24, 40)))
    assert np.linalg.norm(triangle - moved) < 0.3 * np.linalg.norm(triangle - descriptor(_ellipse(14, 0.3)))
    assert np.linalg.norm(triangle - moved) < 0.3 * np.linalg.norm(triangle - descriptor(_disk(14)))


def test_a_triangle_scores_high_and_an_ellipse_labelled_triangle_low():
    prior = _prior()
    assert sorted(prior.class_ids.tolist()) == [1] * 6 + [2] * 6  # each instance, and each semantic piece
    triangle = np.where(_polygon(3, 15, 0.7), TRIANGLE, 0).astype(np.uint8)
    ellipse = np.where(_ellipse(15, 0.7), TRIANGLE, 0).astype(np.uint8)
    assert prior.fidelity(triangle) > 0.7 and prior.fidelity(ellipse) < 0.5
    # one wrong object makes the sample wrong
    both = np.maximum(
        np.where(_polygon(3, 9, 0.7, centre=(18, 18)), TRIANGLE, 0), np.where(_disk(9, (46, 46)), TRIANGLE, 0)
    )
    assert prior.fidelity(both.astype(np.uint8)) < 0.5


def test_what_cannot_be_judged_is_neutral():
    prior = _prior()
    at_border = np.where(_polygon(3, 15, 0.7, centre=(5, 32)), TRIANGLE, 0).astype(np.uint8)
    unknown_class = np.where(_polygon(3, 15, 0.7), 3, 0).astype(np.uint8)
    assert (
        prior.fidelity(at_border)
        == prior.fidelity(unknown_class)
        == prior.fidelity(np.zeros((64, 64), np.uint8))
        == UNJUDGED
    )


def test_a_wrong_shape_with_the_better_score_loses_its_slot():
    decisions = [
        {"id": "000000", "score": 0.80, "kept": True, "shape": 0.2},  # an ellipse labelled triangle
        {"id": "000001", "score": 0.70, "kept": True, "shape": 0.9},
        {"id": "000002", "score": 0.70, "kept": True},  # one draw: never judged
    ]
    assert [d["kept"] for d in best_per_slot(decisions, [0, 0, 1])] == [False, True, True]
