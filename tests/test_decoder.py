"""The P-Decoder: inputs, training, persistence, evaluation."""

import dataclasses

import numpy as np
import pytest
import torch

from datasetdm.backbones.base import Features
from datasetdm.decoder.heads import DepthHead, _surface_terms, coordinate_grid
from datasetdm.decoder.inputs import class_attention, prompt_classes, semantic_labels
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import _depth_target, predict, predict_semantic, train_decoder, view
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.instances import InstanceAP, instances_from_semantic
from datasetdm.evaluate.semantic import confusion_matrix, evaluate_decoder, iou_from_confusion
from datasetdm.realset import load_real_set, write_real_set


@pytest.fixture
def labelled(tiny_params, tmp_path):
    write_real_set(tiny_params.world, tmp_path / "set", 4, seed=7)
    return load_real_set(tmp_path / "set", tiny_params.world.classes)


def test_class_attention_picks_named_classes(tiny_backbone):
    classes = ("circle", "square", "star")
    att = torch.rand(2, 77, 8, 8)  # CLIP's 77 tokens at the 8x8 latent of the tiny SD
    feats = Features([], att, ["two red circles", "a blue square and a red circle"])
    out = class_attention(feats, tiny_backbone, classes)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[0, 0], att[0, 3] / att[0, 3].max())  # "circles" is token 3
    assert out[0, 1].abs().sum() == 0 and out[0, 2].abs().sum() == 0
    assert prompt_classes("a blue square and a red circle", tiny_backbone, classes) == ["circle", "square"]


def test_objects_from_the_decoder_classes_from_the_attention():
    """Where a prompt names two classes, each object pixel takes the named class whose attention is strongest
    there; background and one-class prompts are the decoder's; ``decoder`` keeps its argmax."""
    probs = torch.zeros(3, 4, 8, 8)  # background + 3 classes
    probs[:, 0] = 1.0
    probs[:, 0, 2:6, 1:7] = 0.2  # an object across the middle
    probs[:, 1, 2:6, 1:7] = 0.5  # the decoder calls all of it class 1 ...
    probs[:, 2, 2:6, 1:7] = 0.3
    attention = torch.zeros(3, 3, 4, 4)
    attention[:, 0, :, :2] = 1.0  # ... the attention puts class 1 on the left half
    attention[:, 1, :, 2:] = 1.0  # and class 2 on the right
    attention[:, 2] = 5.0  # a class no prompt names never wins
    named = torch.tensor([[True, True, True, False], [True, True, False, False], [False, False, False, False]])
    named[2, 0] = True  # the third prompt names no class
    labels = semantic_labels(probs, attention, named, "attention")
    assert (labels[0, :2] == 0).all() and (labels[0, 6:] == 0).all()  # background stays
    assert (labels[0, 2:6, 1:4] == 1).all() and (labels[0, 2:6, 4:7] == 2).all()
    assert (labels[1] == probs[1].argmax(0)).all()  # one named class: the decoder's labels
    assert (labels[2] == 0).all()
    assert (semantic_labels(probs, attention, named, "decoder") == probs.argmax(1)).all()


def test_training_lowers_the_loss_and_roundtrips(tiny_backbone, tiny_params, labelled, tmp_path):
    cfg = tiny_params.decoder.__class__(**{**tiny_params.decoder.__dict__, "steps": 25, "heads": ("semantic",)})
    decoder, stats = train_decoder(
        tiny_backbone, labelled, tiny_params.world.classes, cfg=cfg, bb=tiny_params.backbone
    )
    assert np.isfinite(stats["final_loss"]) and stats["final_loss"] < stats["first_loss"]
    decoder.save(tmp_path / "dec")
    loaded = PDecoder.load(tmp_path / "dec")
    assert loaded.fingerprint() == decoder.fingerprint()
    images = torch.rand(2, 3, 32, 32)
    feats = tiny_backbone.extract_features(images, ["a red circle", "a blue square"], 100, [1, 2])
    probs = predict_semantic(loaded, tiny_backbone, feats, images, classes=tiny_params.world.classes)
    assert probs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 32))
    # Only the classes a prompt names can win: "a red circle" never gets square pixels.
    assert probs[0, 2].max() < 1e-3 and probs[1, 1].max() < 1e-3
    metrics = evaluate_decoder(tiny_backbone, loaded, labelled, tiny_params.backbone)
    for key in ("semantic", "semantic_unrestricted", "attention_only"):
        assert 0 <= metrics[key]["mIoU"] <= 1 and set(metrics[key]["per_class_iou"]) == {
            "background",
            "circle",
            "square",
        }
    assert "depth" not in metrics and "keypoints" not in metrics
    assert 0 <= metrics["instances"]["AP"] <= 1 and metrics["instances"]["num_instances"] > 0
    f = metrics["filter"]
    assert 0 <= f["kept_fraction"] <= 1 and 0 <= f["image_mIoU_all"] <= 1


def test_instance_grouping_and_coco_ap():
    """Two separate squares of class 1 become two instances; perfect predictions give AP 1."""
    labels = np.zeros((32, 32), np.uint8)
    labels[2:10, 2:10] = 1
    labels[20:30, 20:30] = 1
    probs = np.zeros((2, 32, 32), np.float32)
    probs[1] = labels == 1
    found = instances_from_semantic(labels, probs)
    assert [k for k, _, _ in found] == [1, 1] and all(score == 1.0 for *_, score in found)
    truth = np.stack([m for _, m, _ in found])
    ap = InstanceAP(("circle",))
    ap.update(1, truth, ["circle", "circle"], found)
    assert ap.result()["AP"] == pytest.approx(1.0)
    worse = InstanceAP(("circle",))
    worse.update(1, truth, ["circle", "circle"], found[:1])
    assert worse.result()["AP"] < 0.6


def _train(tiny_backbone, tiny_params, labelled, steps: int, heads: tuple[str, ...]):
    cfg = dataclasses.replace(tiny_params.decoder, steps=steps, heads=heads)
    return train_decoder(tiny_backbone, labelled, tiny_params.world.classes, cfg=cfg, bb=tiny_params.backbone)


def _predict_two_images(decoder, tiny_backbone, tiny_params) -> dict[str, torch.Tensor]:
    images = torch.rand(2, 3, 32, 32)
    feats = tiny_backbone.extract_features(images, ["a red circle", "a blue square"], 100, [1, 2])
    return predict(decoder, tiny_backbone, feats, images, classes=tiny_params.world.classes)


def test_depth_head_trains_and_is_evaluated(tiny_backbone, tiny_params, labelled):
    decoder, stats = _train(tiny_backbone, tiny_params, labelled, 25, ("semantic", "depth"))
    assert np.isfinite(stats["final_loss"]) and stats["final_loss"] < stats["first_loss"]
    out = _predict_two_images(decoder, tiny_backbone, tiny_params)
    assert out["depth"].shape == (2, 32, 32) and bool((out["depth"] > 0).all())
    depth = evaluate_decoder(tiny_backbone, decoder, labelled, tiny_params.backbone)["depth"]
    assert depth["abs_rel"] >= 0 and 0 <= depth["delta1"] <= 1 and np.isfinite(depth["rmse"])
    # decoder.depth_background_prior (default on): the surface is fitted to the labelled backgrounds
    surface = decoder.heads["depth"].background_surface(32, 32)
    ground = np.concatenate([x.depth[x.semantic == 0] for x in labelled])
    assert ground.min() * 0.9 < surface.mean().item() < ground.max() * 1.1, (surface.mean(), ground.mean())


def test_keypoint_head_trains_and_is_evaluated(tiny_backbone, tiny_params, labelled):
    decoder, stats = _train(tiny_backbone, tiny_params, labelled, 40, ("semantic", "keypoints"))
    assert np.isfinite(stats["keypoints_final_loss"]) and stats["keypoints_final_loss"] < stats["keypoints_first_loss"]
    heat = _predict_two_images(decoder, tiny_backbone, tiny_params)["keypoints"]
    assert heat.shape == (2, 2, 32, 32) and bool(((heat >= 0) & (heat <= 1)).all())
    kp = evaluate_decoder(tiny_backbone, decoder, labelled, tiny_params.backbone)["keypoints"]
    assert kp["num_instances"] > 0 and 0 <= kp["AP"] <= 1 and kp["oks_sigma"] == 0.1


def test_every_head_lowers_its_own_loss(tiny_backbone, tiny_params, labelled):
    _, stats = _train(tiny_backbone, tiny_params, labelled, 40, ("semantic", "depth", "keypoints"))
    for head in ("semantic", "depth", "keypoints"):
        assert (
            np.isfinite(stats[f"{head}_final_loss"]) and stats[f"{head}_final_loss"] < stats[f"{head}_first_loss"]
        ), head


def test_miou_arithmetic():
    target = np.array([[0, 1], [1, 2]])
    pred = np.array([[0, 1], [2, 2]])
    iou = iou_from_confusion(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.5])


def test_corrupt_decoder_checkpoint(tmp_path):
    dec = PDecoder(
        {
            "map_channels": [8],
            "classes": ["circle"],
            "channels": 16,
            "image_skip": False,
            "heads": ["semantic"],
            "image_size": 32,
        }
    )
    dec.save(tmp_path / "dec")
    (tmp_path / "dec" / "decoder.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DatasetDMError, match="decoder.safetensors: not a readable safetensors file"):
        PDecoder.load(tmp_path / "dec")
    with pytest.raises(DatasetDMError, match="decoder.out: no trained decoder here"):
        PDecoder.load(tmp_path / "missing")


def test_zero_shot_labels_name_only_prompted_classes(tiny_backbone, tiny_params, labelled):
    """A class the decoder never saw ("hexagon") can only come from a prompt that names it."""
    from datasetdm.evaluate.zero_shot import zero_shot_labels

    cfg = tiny_params.decoder.__class__(**{**tiny_params.decoder.__dict__, "steps": 5})
    decoder, _ = train_decoder(tiny_backbone, labelled, tiny_params.world.classes, cfg=cfg, bb=tiny_params.backbone)
    seen, unseen = tiny_params.world.classes, ("hexagon",)
    images = torch.rand(2, 3, 32, 32)
    labels = zero_shot_labels(
        decoder,
        tiny_backbone,
        images,
        ["a red hexagon", "a blue square"],
        seen=seen,
        unseen=unseen,
        timestep=100,
        seeds=[1, 2],
    )
    assert labels.shape == (2, 32, 32)
    assert set(labels[0].unique().tolist()) <= {0, 3}  # background or hexagon
    assert set(labels[1].unique().tolist()) <= {0, 2}  # background or square


def test_bank_of_images_takes_exactly_those_images_rows(tiny_backbone, tiny_params, labelled):
    """The k-fold study trains each fold on its images' part of one bank: the same images and labels as a
    bank built from those images alone."""
    from datasetdm.decoder.train import bank_of_images, feature_bank

    args = (tiny_backbone, labelled, tiny_params.backbone, tiny_params.world.classes)
    whole = feature_bank(*args, views=2)
    part = bank_of_images(whole, [1, 3], views=2)
    alone = feature_bank(tiny_backbone, [labelled[1], labelled[3]], *args[2:], views=2)
    torch.testing.assert_close(part[3], alone[3])
    for head in ("semantic", "depth", "keypoints"):
        torch.testing.assert_close(part[4][head], alone[4][head])
    assert [m.shape for m in part[0]] == [m.shape for m in alone[0]] and torch.equal(part[2], alone[2])


@pytest.mark.parametrize("coords", [False, True])
def test_depth_head_reads_the_ground_plane_only_from_coordinates(coords):
    """Features that say nothing (constant) and a target that depends on the row alone, as the
    ground plane's does: only the head that sees pixel coordinates can fit it."""
    torch.manual_seed(0)
    features = torch.ones(2, 8, 16, 16)
    target = torch.linspace(10.0, 6.0, 16)[None, :, None].expand(2, 16, 16)
    head = DepthHead(8, 2, coords=coords)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(400):
        loss = DepthHead.loss(head(features), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        abs_rel = ((DepthHead.metres(head(features)) - target).abs() / target).mean().item()
    assert (abs_rel < 0.03) if coords else (abs_rel > 0.08), abs_rel  # measured: 0.014 and 0.106


def test_a_decoder_saved_before_depth_coordinates_loads_without_them(tmp_path):
    config = {"map_channels": [8, 8], "classes": ["circle"], "channels": 16, "image_skip": False}
    old = PDecoder({**config, "heads": ["semantic", "depth"], "image_size": 16})
    assert "depth_coords" not in old.config and not old.heads["depth"].coords
    old.save(tmp_path / "old")
    assert not PDecoder.load(tmp_path / "old").heads["depth"].coords
    new = PDecoder({**config, "heads": ["semantic", "depth"], "image_size": 16, "depth_coords": True})
    new.save(tmp_path / "new")
    loaded = PDecoder.load(tmp_path / "new")
    assert loaded.heads["depth"].coords and loaded.fingerprint() == new.fingerprint()


def test_rotated_views_keep_only_their_objects_depth(labelled):
    """The ground recedes upwards in every real image, so a rotated view's background gets no depth
    target; its objects keep theirs when asked (a rolled camera sees them at the same distance)."""
    x = labelled[0]
    assert (x.semantic > 0).any() and (x.semantic == 0).any()
    np.testing.assert_array_equal(_depth_target(x, 1, False), view(x.depth, 1))
    assert not _depth_target(x, 2, False).any()
    rotated = _depth_target(x, 2, True)
    objects = view(x.semantic, 2) > 0
    np.testing.assert_array_equal(rotated[objects], view(x.depth, 2)[objects])
    assert not rotated[~objects].any()


def _ground(levels: list[float], size: int = 16) -> torch.Tensor:
    """Ground planes (N, H, W) metres, far at the top row, each ``level`` metres off the mean plane."""
    rows = torch.linspace(10.0, 6.0, size)[:, None].expand(size, size)
    return torch.stack([rows + level for level in levels])


def test_background_prior_is_the_mean_ground_surface_on_background_pixels_only():
    """Each image's ground level is invisible, so the prior is the mean surface of the labelled
    backgrounds; objects and unknown pixels take no part in it, and only pixels labelled
    background are replaced."""
    depth = _ground([-1.0, 0.0, 1.0])
    semantic = torch.zeros(3, 16, 16, dtype=torch.long)
    semantic[:, 4:8, 4:8] = 1
    depth[:, 4:8, 4:8] = 50.0  # an object: not ground, must not pull the fit
    depth[1, 12:, :] = 0  # unknown (on the mean-level image, so the mean stays 0 there)
    head = DepthHead(8, 2, background_prior=True)
    head.fit_background(depth, semantic)
    torch.testing.assert_close(head.background_surface(16, 16), _ground([0.0])[0], atol=1e-3, rtol=0)
    head_out = torch.full((1, 16, 16), 3.0)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :, :8] = 2
    stored = head.depth_labels(head_out, labels)
    assert bool((stored[0, :, :8] == 3.0).all())
    torch.testing.assert_close(stored[0, :, 8:], _ground([0.0])[0][:, 8:], atol=1e-3, rtol=0)
    assert torch.equal(DepthHead(8, 2).depth_labels(head_out, labels), head_out)  # without the prior: the head's


def test_background_prior_is_the_least_squares_fit_over_every_background_pixel():
    """``fit_background`` sums the normal equations per pixel position to keep its memory at one
    image's; the surface must be the one least squares over all the bank's pixels gives."""
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(12, 20, 24, generator=gen) * 4 + 6
    depth[3, :5] = 0  # unknown
    semantic = (torch.rand(12, 20, 24, generator=gen) < 0.3).long()
    known = (semantic == 0) & (depth > 0)
    terms = _surface_terms(coordinate_grid(depth[:, None]).double())[:, known]  # (T, pixels)
    direct = torch.linalg.lstsq(terms.T, depth[known].double()[:, None]).solution[:, 0]
    head = DepthHead(8, 2, background_prior=True)
    head.fit_background(depth, semantic)
    torch.testing.assert_close(head.surface, direct.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no background pixel"):
        head.fit_background(depth, torch.ones_like(semantic))


def test_background_prior_round_trips_and_old_decoders_load_without_it(tmp_path):
    config = {"map_channels": [8, 8], "classes": ["circle"], "channels": 16, "image_skip": False}
    old = PDecoder({**config, "heads": ["semantic", "depth"], "image_size": 16})
    old.save(tmp_path / "old")
    assert not PDecoder.load(tmp_path / "old").heads["depth"].background_prior
    new = PDecoder({**config, "heads": ["semantic", "depth"], "image_size": 16, "depth_background_prior": True})
    new.heads["depth"].fit_background(_ground([0.5, -0.5]), torch.zeros(2, 16, 16, dtype=torch.long))
    new.save(tmp_path / "new")
    loaded = PDecoder.load(tmp_path / "new")
    torch.testing.assert_close(
        loaded.heads["depth"].background_surface(8, 8), new.heads["depth"].background_surface(8, 8)
    )
    assert loaded.fingerprint() == new.fingerprint()
