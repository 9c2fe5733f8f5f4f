"""Generation in shards, resume, filtering and export on a tiny real backbone + decoder."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from datasetdm import generate as generate_module
from datasetdm import stages
from datasetdm.errors import DatasetDMError
from datasetdm.filtering import (
    LABEL_CLEANING,
    filter_samples,
    quality_components,
    quality_score,
    relabel_enclosed,
    remove_speckle,
)
from datasetdm.generate import generate, plan_samples, read_records


@pytest.fixture
def trained(tiny_params):
    stages.make_real_sets(tiny_params)
    stages.train_decoder_stage(tiny_params)
    stages.expand_prompts_stage(tiny_params)
    return tiny_params


def test_plan_is_per_sample(tiny_params):
    plan = plan_samples(["a", "b"], tiny_params.generate)
    assert [p.prompt for p in plan] == ["a", "b", "a", "b", "a", "b"]
    assert len({p.seed for p in plan}) == 6


def test_generate_filter_export(trained):
    p = trained
    out = stages.generate_stage(p)
    assert out == {"num_samples": 6, "shards": 2, "made": 6}
    records = read_records(p.generate.out)
    assert [r["id"] for r in records] == [f"{i:06d}" for i in range(6)]
    r = records[0]
    for key in ("prompt", "seed", "backbone", "decoder", "scheduler", "steps", "guidance_scale", "quality"):
        assert key in r
    assert set(r["quality"]) == {"confidence", "classes", "agreement", "area"}
    assert all(0 <= v <= 1 for rec in records for v in rec["quality"].values())
    # Curation's inputs: the decoder's class distribution and the backbone's pooled view.
    assert all(len(rec["class_probs"]) == 1 + len(p.world.classes) for rec in records)
    assert all(sum(rec["class_probs"]) == pytest.approx(1.0, abs=1e-4) for rec in records)
    shard_embeddings = [np.load(Path(p.generate.out) / f"shard-0000{k}" / "embeddings.npy") for k in (0, 1)]
    embeddings = np.concatenate(shard_embeddings).astype(np.float32)
    assert embeddings.shape[0] == 6 and np.linalg.norm(embeddings, axis=1) == pytest.approx(1.0, abs=1e-2)
    assert len({e.tobytes() for e in embeddings}) == 6  # each image its own

    stages.filter_stage(p)
    stages.export_stage(p)
    coco = COCO(f"{p.export.out}/annotations.json")
    assert len(coco.getImgIds()) == 6
    exported = np.load(Path(p.export.out) / "embeddings.npy").astype(np.float32)
    rows = {r["id"]: e for r, e in zip(records, embeddings)}
    assert all(np.array_equal(exported[i], rows[im["sample_id"]]) for i, im in enumerate(coco.dataset["images"]))
    card = json.loads(open(f"{p.export.out}/dataset.json").read())
    assert card["counts"]["kept"] == 6


def test_resume_reuses_finished_shards(trained, caplog, monkeypatch):
    from pathlib import Path

    p = trained
    assert stages.generate_stage(p)["made"] == 6
    shard = Path(p.generate.out) / "shard-00000" / "records.json"
    manifest = (Path(p.generate.out) / "manifest.json").read_bytes()
    first = shard.stat().st_mtime_ns
    (Path(p.generate.out) / "shard-00001" / "records.json").unlink()  # as a run killed before its last shard
    with caplog.at_level(logging.INFO, logger="datasetdm"):
        resumed = stages.generate_stage(p)
    assert shard.stat().st_mtime_ns == first
    # What this run made, not what it reused, is its work (images per hour counts it); the seal is the same bytes.
    assert resumed == {"num_samples": 6, "shards": 2, "made": 2}  # shards of 4 and 2
    assert (Path(p.generate.out) / "manifest.json").read_bytes() == manifest
    said = [r.getMessage() for r in caplog.records if r.name == "datasetdm.generate"]
    assert "shard-00000: reused (same samples, same models)" in said  # the decision is logged, not silent

    # Shards whose masks were cleaned another way (an older release) are remade, not reused.
    monkeypatch.setattr(generate_module, "LABEL_CLEANING", ("remove_speckle",))
    stages.generate_stage(p)
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasetdm"):
        stages.generate_stage(p)
    said = [r.getMessage() for r in caplog.records if r.name == "datasetdm.generate"]
    assert "shard-00000: rebuilt (plan or models changed)" in said
    assert all(r["label_cleaning"] == list(LABEL_CLEANING) for r in json.loads(shard.read_text()))


def test_filter_threshold():
    recs = [
        {"id": str(i), "shard": "s", "quality": {"confidence": q, "classes": q, "agreement": q}}
        for i, q in enumerate([0.2, 0.9])
    ]
    out = filter_samples(recs, 0.5)
    assert [s["kept"] for s in out["samples"]] == [False, True]
    assert out["kept"] == 1 and quality_score(recs[1]["quality"]) == pytest.approx(0.9)


def test_a_missing_named_object_vetoes_the_sample():
    """A confident all-background mask with a few stray pixels of the named class (a failed image)."""
    probs = torch.zeros(2, 3, 64, 64)
    probs[:, 0] = 0.99
    probs[:, 1] = 0.01
    probs[0, :, :5, :5] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # 25 px of class 0 = 0.6%
    probs[1, :, :32, :32] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # a quarter of the image
    attention = torch.zeros(2, 2, 8, 8)
    attention[:, 0, :4, :4] = 1.0
    stray, real = quality_components(probs, attention, [[0], [0]])
    assert stray["classes"] == 1.0 and stray["confidence"] > 0.9  # the signals that were fooled
    assert quality_score(stray) < 0.5 <= quality_score(real)


def test_speckle_is_not_an_object():
    """A noise image's mask: 4% of the pixels labelled, scattered one by one."""
    probs = torch.zeros(1, 2, 64, 64)
    probs[:, 0] = 1.0
    speckle = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.04
    probs[0, 1][speckle], probs[0, 0][speckle] = 1.0, 0.0
    (q,) = quality_components(probs, torch.ones(1, 1, 8, 8), [[0]])
    assert q["area"] < 0.2 and quality_score(q) < 0.2


def test_prompt_the_tokenizer_cannot_encode_names_the_file_and_index(trained, tiny_backbone):
    from datasetdm.decoder.model import PDecoder

    decoder = PDecoder.load(trained.decoder.out)
    with pytest.raises(DatasetDMError, match=r"prompts.json: prompts\[1\]: .*cannot encode"):
        generate(
            tiny_backbone,
            decoder,
            ["a red circle", "a red circle $$"],
            gen=trained.generate,
            bb=trained.backbone,
            out_dir=trained.generate.out,
            prompts_source="prompts.json",
        )
    with pytest.raises(DatasetDMError, match=r"prompts\[0\]: .* names no class"):
        generate(
            tiny_backbone,
            decoder,
            ["a red star"],
            gen=trained.generate,
            bb=trained.backbone,
            out_dir=trained.generate.out,
            prompts_source="prompts.json",
        )


def test_speckle_takes_the_label_around_it():
    labels = np.zeros((12, 12), np.uint8)
    labels[2:10, 2:10] = 1  # an object
    labels[5, 5] = 2  # a stray pixel inside it
    labels[0, 11] = 1  # a stray pixel in the background
    clean = remove_speckle(labels, min_pixels=4)
    expected = np.zeros((12, 12), np.uint8)
    expected[2:10, 2:10] = 1
    assert (clean == expected).all()
    assert (remove_speckle(expected, min_pixels=4) == expected).all()


def test_a_piece_ringed_by_one_other_class_takes_that_class_and_real_layouts_stay():
    labels = np.zeros((16, 16), np.uint8)
    labels[2:12, 2:12] = 2  # a square
    labels[5:8, 5:9] = 4  # a star-labelled island inside it
    expected = labels.copy()
    expected[5:8, 5:9] = 2
    assert (relabel_enclosed(labels) == expected).all()
    kept = np.zeros((16, 16), np.uint8)
    kept[2:12, 2:12] = 2
    kept[5:8, 5:9] = 0  # a background hole: overlapping shapes leave these, they stay
    kept[0:4, 12:16] = 3  # a piece at the border: what lies beyond is unknown
    kept[6:14, 12:15] = 1  # a piece touching two classes and background
    assert (relabel_enclosed(kept) == kept).all()


def test_img2img_keeps_the_layout_and_filter_is_measured_on_it(tiny_backbone, tiny_params):
    """Regeneration from a known image stays nearer to it at low strength; the measurement reports kept/dropped
    agreement."""
    import torch

    from datasetdm.decoder.train import train_decoder
    from datasetdm.evaluate.regenerated import filter_on_regenerated
    from datasetdm.realset import load_real_set, write_real_set
    from datasetdm.worlds.shapes import render_scene

    scene = render_scene(tiny_params.world, 3)
    init = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    bb = tiny_params.backbone
    with torch.no_grad():  # a random-weight VAE cannot reproduce the image: compare with its own reconstruction
        vae = tiny_backbone.vae
        recon = (
            vae.decode(tiny_backbone._encode(init) / vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5
        ).clamp(0, 1)
    near, _ = tiny_backbone.sample(
        [scene.caption],
        [1],
        steps=10,
        guidance_scale=bb.guidance_scale,
        capture_timestep=None,
        init_images=init,
        strength=0.1,
    )
    far, _ = tiny_backbone.sample(
        [scene.caption],
        [1],
        steps=10,
        guidance_scale=bb.guidance_scale,
        capture_timestep=None,
        init_images=init,
        strength=1.0,
    )
    assert (near - recon).abs().mean() < (far - recon).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        tiny_backbone.sample(
            [scene.caption],
            [1],
            steps=10,
            guidance_scale=bb.guidance_scale,
            capture_timestep=None,
            init_images=init,
            strength=0.0,
        )

    write_real_set(tiny_params.world, tiny_params.real.dir, 4, seed=1)
    decoder, _ = train_decoder(
        tiny_backbone,
        load_real_set(tiny_params.real.dir, tiny_params.world.classes),
        tiny_params.world.classes,
        cfg=tiny_params.decoder,
        bb=bb,
    )
    result = filter_on_regenerated(
        tiny_backbone, decoder, tiny_params.world, bb, min_score=0.0, num=5, seed=700000, strength=0.6, batch_size=2
    )
    assert result["num_images"] == 5 and result["kept_fraction"] == 1.0 and result["image_mIoU_dropped"] is None
    assert 0 <= result["image_mIoU_all"] <= 1 and result["image_mIoU_kept"] == result["image_mIoU_all"]


def test_a_shard_edited_after_generation_stops_the_filter_and_generate_remakes_it(trained, tiny_params_file):
    """The manifest protects the reader: an edited shard is one line at `filter`, the
    earlier filter output stays as it was, and `generate` remakes exactly that shard."""
    import subprocess
    import sys
    from pathlib import Path

    from datasetdm.io import sha256_file
    from tests.conftest import REPO

    p = trained

    def cli(stage: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "datasetdm", stage, "--params", str(tiny_params_file)]
        return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)

    # Every generation through the CLI: byte-identity is promised between runs alike
    # (same process setup and thread count), not between a test process and a CLI one.
    assert cli("generate").returncode == 0 and cli("filter").returncode == 0
    gen = Path(p.generate.out)
    made = {f: sha256_file(f) for f in sorted(gen.rglob("*")) if f.is_file()}
    filtered = Path(p.filter.out).read_bytes()

    records_file = gen / "shard-00001" / "records.json"
    records = json.loads(records_file.read_text())
    records[0]["prompt"] = "a blue star"  # one prompt changed by hand
    records_file.write_text(json.dumps(records))
    image = gen / "shard-00000" / "images" / "000000.png"
    image.write_bytes(image.read_bytes() + b"\0")  # and one image
    refused = cli("filter")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "shard-00000: shards[0].sha256: its files changed" in refused.stderr
    assert "run the generate stage" in refused.stderr
    assert Path(p.filter.out).read_bytes() == filtered

    assert cli("generate").returncode == 0
    assert {
        f: sha256_file(f) for f in sorted(gen.rglob("*")) if f.is_file()
    } == made  # both shards remade as they were
    assert cli("filter").returncode == 0 and Path(p.filter.out).read_bytes() == filtered
