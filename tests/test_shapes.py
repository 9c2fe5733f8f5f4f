"""The shapes world: labels must be exact and a pure function of (config, seed)."""

from __future__ import annotations

import numpy as np
import pytest

from datasetdm.config import WorldConfig
from datasetdm.worlds.shapes import KEYPOINT_NAMES, caption_for, render_scene

WORLD = WorldConfig(image_size=32)
SEEDS = range(40)


def test_same_seed_gives_identical_scene() -> None:
    a, b = render_scene(WORLD, 5), render_scene(WORLD, 5)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.semantic.tobytes() == b.semantic.tobytes()
    assert a.instances.tobytes() == b.instances.tobytes()
    assert a.depth.tobytes() == b.depth.tobytes()
    assert a.caption == b.caption
    assert all(np.array_equal(x, y) for x, y in zip(a.keypoints, b.keypoints))


def test_different_seeds_differ() -> None:
    a, b = render_scene(WORLD, 1), render_scene(WORLD, 2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.depth, b.depth)


def test_caption_is_canonical_and_counts() -> None:
    assert caption_for([("circle", "red"), ("circle", "red")]) == "two red circles"
    assert (
        caption_for([("square", "blue"), ("circle", "red"), ("square", "blue")]) == "a red circle and two blue squares"
    )
    # Order of placement does not matter; groups sort by shape, then colour.
    objs = [("star", "green"), ("circle", "yellow"), ("circle", "blue")]
    assert caption_for(objs) == caption_for(objs[::-1]) == "a blue circle and a yellow circle and a green star"


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_agree_with_each_other(seed: int) -> None:
    scene = render_scene(WORLD, seed)
    n, h, w = scene.instances.shape
    assert n == len(scene.objects) == len(scene.keypoints)
    assert (h, w) == scene.semantic.shape == scene.depth.shape == scene.image.shape[:2]
    assert scene.image.dtype == np.uint8 and scene.semantic.dtype == np.uint8
    assert scene.instances.dtype == bool and scene.depth.dtype == np.float32
    # Instances are visible pixels, so they never overlap.
    assert scene.instances.sum(axis=0).max() <= 1
    # Semantic = union of instances, each with 1 + its class index.
    expected = np.zeros((h, w), dtype=np.uint8)
    for obj, mask in zip(scene.objects, scene.instances):
        expected[mask] = 1 + WORLD.classes.index(obj.shape)
    assert np.array_equal(scene.semantic, expected)
    # Object pixels carry the object's depth; the ground behind is farther than any object.
    for obj, mask in zip(scene.objects, scene.instances):
        assert np.allclose(scene.depth[mask], obj.depth)
    background = scene.semantic == 0
    assert scene.depth[background].min() > max(o.depth for o in scene.objects)
    # The caption names every object, occluded or not.
    assert scene.caption == caption_for([(o.shape, o.colour) for o in scene.objects])


def test_much_nearer_objects_are_larger() -> None:
    # Radius has a +-10% jitter on top of the depth-derived size; with the default
    # world a depth gap of 1.3 m or more always outweighs it.
    pairs = 0
    for seed in range(100):
        objs = render_scene(WORLD, seed).objects
        for a in objs:
            for b in objs:
                if b.depth - a.depth >= 1.5:
                    pairs += 1
                    assert a.radius > b.radius
    assert pairs > 20


def test_centre_of_unoccluded_object_is_visible() -> None:
    for seed in range(10):
        scene = render_scene(WORLD, seed, layout=[("triangle", "red")])
        kps = scene.keypoints[0]
        assert kps.shape == (len(KEYPOINT_NAMES["triangle"]), 3) and kps.dtype == np.float32
        obj = scene.objects[0]
        assert tuple(kps[0]) == (np.float32(obj.cx), np.float32(obj.cy), 2)


def test_keypoints_outside_image_are_unlabelled() -> None:
    found = 0
    for seed in SEEDS:
        scene = render_scene(WORLD, seed)
        for obj, kps in zip(scene.objects, scene.keypoints):
            for (x, y), row in zip(obj.keypoints(), kps):
                if 0 <= x < WORLD.image_size and 0 <= y < WORLD.image_size:
                    assert row[2] in (1, 2) and (row[0], row[1]) == (np.float32(x), np.float32(y))
                else:
                    found += 1
                    assert tuple(row) == (0, 0, 0)
    assert found > 0


@pytest.mark.parametrize("size", [32, 96])
def test_image_size_is_configurable(size: int) -> None:
    scene = render_scene(WorldConfig(image_size=size), 3)
    assert scene.image.shape == (size, size, 3)
    assert scene.instances.shape[1:] == scene.semantic.shape == scene.depth.shape == (size, size)
    assert all(m.any() for m in scene.instances)
