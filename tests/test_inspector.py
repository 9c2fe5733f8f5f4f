"""The inspector and the backbone audit: real segmenter, real rendered scenes, real (tiny) backbones."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from datasetdm.config import InspectConfig, WorldConfig
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.backbone import (
    codec_quality,
    fidelity_layouts,
    frechet_distance,
    measure_backbone,
    prompt_fidelity,
)
from datasetdm.evaluate.inspector import Inspector, render_set, train_inspector
from datasetdm.worlds.shapes import render_scene
from tests.conftest import build_tiny_inspector

WORLD = WorldConfig(
    image_size=64, classes=("circle", "square", "triangle", "star"), colours=("red", "green", "blue", "yellow")
)


def test_reading_true_labels_recovers_the_scene_objects():
    """Given exact masks, shape, colour and count come out right for nearly every scene (occlusion can split or hide
    one)."""
    reader = Inspector(build_tiny_inspector().model, WORLD.classes, WORLD.colours, min_area=12)
    exact = []
    for seed in range(60):
        scene = render_scene(WORLD, 4242 + seed)
        exact.append(
            reader.read_objects(scene.image, scene.semantic) == Counter((o.shape, o.colour) for o in scene.objects)
        )
    assert np.mean(exact) >= 0.85


def test_a_wrong_colour_or_shape_is_read_as_such():
    scene = render_scene(WORLD, 7, layout=[("circle", "red")])
    reader = Inspector(build_tiny_inspector().model, WORLD.classes, WORLD.colours, min_area=12)
    assert reader.read_objects(scene.image, scene.semantic) == Counter({("circle", "red"): 1})
    relabelled = np.where(scene.semantic > 0, 1 + WORLD.classes.index("star"), 0)
    assert reader.read_objects(scene.image, relabelled) == Counter({("star", "red"): 1})
    bluer = scene.image.copy()
    bluer[scene.semantic > 0] = (40, 80, 230)
    assert reader.read_objects(bluer, scene.semantic) == Counter({("circle", "blue"): 1})


def test_trained_inspector_learns_and_round_trips(tmp_path):
    cfg = InspectConfig(classes=WORLD.classes, train_images=64, steps=30, batch_size=8, width=8, num_test=16, seed=123)
    world = dataclasses.replace(WORLD, image_size=32)
    inspector, stats = train_inspector(world, cfg)
    assert stats["num_test"] == 16 and 0.2 < stats["mIoU"] <= 1.0  # above chance after 30 steps
    inspector.save(tmp_path / "insp", extra={"held_out": stats})
    again = Inspector.load(tmp_path / "insp")
    images = render_set(world, 4, 99, "test")[0].images
    np.testing.assert_array_equal(inspector.logits(images), again.logits(images))
    assert again.classes == WORLD.classes and again.min_area == cfg.min_area


def test_missing_inspector_is_one_line_naming_the_field(tmp_path):
    with pytest.raises(DatasetDMError, match="inspect.model") as err:
        Inspector.load(tmp_path / "nothing")
    assert "\n" not in str(err.value)


def test_frechet_distance_is_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near, far = frechet_distance(a, b), frechet_distance(a, b + 2.0)
    assert near < 0.5 and far == pytest.approx(8 * 4.0, rel=0.15)


def test_fidelity_layouts_cover_every_shape_and_colour_once_per_cycle():
    singles = fidelity_layouts(("circle", "star"), ("red", "blue"), num=8, num_objects=1, seed=0)
    assert Counter(tuple(lay[0]) for lay in singles) == Counter(
        {p: 2 for p in [("circle", "red"), ("circle", "blue"), ("star", "red"), ("star", "blue")]}
    )
    pairs = fidelity_layouts(("circle", "star"), ("red", "blue"), num=5, num_objects=2, seed=0)
    assert all(len(lay) == 2 for lay in pairs) and pairs == fidelity_layouts(
        ("circle", "star"), ("red", "blue"), num=5, num_objects=2, seed=0
    )


def test_prompt_fidelity_of_rendered_scenes_with_an_oracle_reader():
    """Fidelity counts an image only when every object matches: check on scenes with known objects."""
    layouts = [[("circle", "red")], [("square", "blue")], [("star", "green"), ("triangle", "yellow")]]
    scenes = [render_scene(WORLD, 50 + i, layout=lay) for i, lay in enumerate(layouts)]

    class Oracle(Inspector):  # the real reader, fed the scenes' exact masks instead of a network's
        def segment(self, images, classes=None):
            return np.stack([s.semantic for s in scenes])

    reader = Oracle(build_tiny_inspector().model, WORLD.classes, WORLD.colours, min_area=12)
    images = np.stack([s.image for s in scenes])
    assert prompt_fidelity(reader, images, layouts)[0] == 1.0
    wrong = [layouts[0], [("square", "red")], layouts[2]]
    assert prompt_fidelity(reader, images, wrong)[0] == pytest.approx(2 / 3)


def test_measure_backbone_on_a_tiny_backbone(tiny_params, tiny_backbone, tmp_path):
    result = measure_backbone(tiny_backbone, build_tiny_inspector(), tiny_params, grid=tmp_path / "grid.png")
    pf = result["prompt_fidelity"]
    assert 0 <= pf["single_object"] <= 1 and 0 <= pf["two_objects"] <= 1
    assert set(pf["single_object_by_shape"]) == set(build_tiny_inspector().classes)
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert result["codec"]["num"] == tiny_params.inspect.num_codec
    assert 0 <= pf["single_object_codec"] <= 1 and 0 <= pf["two_objects_codec"] <= 1


def test_codec_audit_reads_reconstructions_beside_originals(tiny_params, tiny_backbone):
    """The VAE round trip is judged against the scenes themselves: lossless codec loses nothing, a random one much."""
    inspector = build_tiny_inspector()
    random_vae = codec_quality(tiny_backbone, inspector, tiny_params)
    assert random_vae["num"] == 4 and random_vae["psnr"] < 20  # random weights: far from the scenes

    class Lossless:
        def autoencode(self, images):
            return images

    lossless = codec_quality(Lossless(), inspector, tiny_params)
    assert lossless["psnr"] is None  # no error at all
    assert lossless["inspector_mIoU_reconstructed"] == lossless["inspector_mIoU_original"]
    assert lossless["inspector_mIoU_original"] == random_vae["inspector_mIoU_original"]  # same scenes, same seeds
