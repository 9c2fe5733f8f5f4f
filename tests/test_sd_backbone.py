"""The Stable Diffusion backbone on a tiny random-weight SD pipeline folder (built here, no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from pycocotools.coco import COCO

from datasetdm import stages
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.tiny_sd import build_sd_components, build_tiny_sd, save_sd_folder, tiny_sd_configs
from datasetdm.config import params_from_dict
from datasetdm.decoder.train import train_decoder
from datasetdm.errors import DatasetDMError
from datasetdm.realset import load_real_set, write_real_set
from tests.conftest import tiny_raw

PROMPTS = ["two red circles and a green square", "a blue circle"]


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", image_size=32)


@pytest.fixture(scope="session")
def sd(sd_dir: Path) -> StableDiffusionBackbone:
    return StableDiffusionBackbone.load(str(sd_dir))


def _one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(DatasetDMError, match=match) as info:
        StableDiffusionBackbone.load(**kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


# -- loading errors --------------------------------------------------------------------
def test_missing_folder(tmp_path):
    text = _one_line_error("backbone.model: no such folder", model=str(tmp_path / "sd-1.5"))
    assert str(tmp_path / "sd-1.5") in text and "huggingface-cli download" in text


def test_hub_id_that_is_not_cached_is_not_downloaded():
    _one_line_error("not in the local Hugging Face cache", model="datasetdm-tests/no-such-model")


def test_not_a_pipeline_folder(tmp_path):
    text = _one_line_error(
        "model_index.json: backbone.model: missing: not a diffusers pipeline folder", model=str(tmp_path)
    )
    assert "save_pretrained" in text


def test_wrong_architecture(sd_dir, tmp_path):
    # another pipeline's model index
    other = tmp_path / "xl"
    shutil.copytree(sd_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    _one_line_error(r"model_index.json: unet: wrong architecture: UNet2DModel", model=str(other))
    # weights that do not match their config
    bad = tmp_path / "bad"
    shutil.copytree(sd_dir, bad)
    cfg = json.loads((bad / "unet/config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 128]
    (bad / "unet/config.json").write_text(json.dumps(cfg))
    _one_line_error(r"bad/unet: backbone.model: cannot load unet \(wrong architecture", model=str(bad))


def test_components_that_do_not_fit(tmp_path):
    configs = tiny_sd_configs()
    configs["unet"]["cross_attention_dim"] = 48  # text encoder emits 32
    save_sd_folder(build_sd_components(configs), tmp_path / "misfit")
    _one_line_error(r"unet/config.json: cross_attention_dim: wrong architecture: 48", model=str(tmp_path / "misfit"))


def test_bad_dtype_and_device(sd_dir):
    _one_line_error(
        r"params.yaml: backbone.dtype: must be one of", model=str(sd_dir), dtype="float64", source="params.yaml"
    )
    if not torch.cuda.is_available():
        _one_line_error(r"backbone.device: 'cuda', but this machine has no CUDA GPU", model=str(sd_dir), device="cuda")
    _one_line_error(r"backbone.device: not a torch device", model=str(sd_dir), device="gpu0")
    # Where results land is chosen at loading, checked as the model's device is.
    _one_line_error(r"backbone.device: not a torch device", model=str(sd_dir), output_device="gpu0")


def test_params_need_a_model_and_a_known_kind(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path / "sd")
    raw["backbone"] = {"model": ""}
    with pytest.raises(DatasetDMError, match="backbone.model: must be a non-empty string"):
        params_from_dict(raw, source="params.yaml")
    raw["backbone"] = {"kind": "toy"}  # the toy backbone is gone: one backbone path, two sizes
    with pytest.raises(DatasetDMError, match=r"backbone.kind: unknown backbone 'toy' \(known: stable-diffusion\)"):
        params_from_dict(raw, source="params.yaml")


# -- text ------------------------------------------------------------------------------
def test_token_positions_follow_bpe(sd):
    prompt = PROMPTS[0]  # two red circles and a green square
    assert sd.tokenizer.tokenize("green") == ["g", "re", "e", "n</w>"]  # a word of several tokens
    assert sd.token_positions(prompt, "green") == [6, 7, 8, 9]
    assert sd.token_positions(prompt, "square") == [10]
    assert sd.token_positions(prompt, "circles") == [3]
    assert sd.token_positions(prompt, "circle") == []  # not inside "circles"
    assert sd.token_positions("a red circle and a red square", "red") == [2, 6]
    ids = sd.tokenizer(prompt).input_ids
    assert sd.tokenizer.convert_ids_to_tokens(ids[10]) == "square</w>"


def test_validate_prompt(sd):
    sd.validate_prompt("a red circle")
    with pytest.raises(DatasetDMError, match="empty prompt"):
        sd.validate_prompt("  ")
    with pytest.raises(DatasetDMError, match="tokens; the CLIP text encoder takes at most 75"):
        sd.validate_prompt(" ".join(["red"] * 80))
    with pytest.raises(DatasetDMError, match="cannot encode"):
        sd.validate_prompt("a red circle $$")


# -- features and sampling ---------------------------------------------------------------
def test_feature_shapes_per_layer(sd):
    feats = sd.extract_features(torch.rand(2, 3, 32, 32), PROMPTS, 100, [1, 2])
    # up blocks coarse -> fine over the 8x8 latent: UpBlock2D (2x2), then two cross-attention blocks
    assert [tuple(m.shape) for m in feats.maps] == [(2, 64, 2, 2), (2, 64, 4, 4), (2, 32, 8, 8)]
    assert feats.attention.shape == (2, 77, 8, 8) and feats.attention.dtype == torch.float32
    torch.testing.assert_close(feats.attention.sum(1), torch.ones(2, 8, 8))
    # real images of another size are resized to the model's, so features keep their shapes
    big = sd.extract_features(torch.rand(2, 3, 64, 64), PROMPTS, 100, [1, 2])
    assert [m.shape for m in big.maps] == [m.shape for m in feats.maps]
    again = sd.extract_features(torch.rand(2, 3, 32, 32), PROMPTS, 100, [1, 2])
    assert not torch.equal(again.maps[-1], feats.maps[-1])  # different images, different features


def test_samples_match_the_stock_pipeline_and_depend_on_their_seed_only(sd, sd_dir):
    images, feats = sd.sample(PROMPTS, [5, 6], steps=3, guidance_scale=2.0, capture_timestep=500)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert feats is not None and feats.attention.shape == (2, 77, 8, 8)  # only the conditional half of CFG
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=2.0,
        output_type="pt",
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
    ).images
    torch.testing.assert_close(images, stock, atol=1e-5, rtol=0)
    plain, none = sd.sample(PROMPTS, [5, 6], steps=3, guidance_scale=2.0, capture_timestep=None)
    assert none is None
    torch.testing.assert_close(plain, images, atol=1e-5, rtol=0)  # capturing changes nothing
    alone, _ = sd.sample(PROMPTS[1:], [6], steps=3, guidance_scale=2.0)
    torch.testing.assert_close(alone, images[1:], atol=1e-5, rtol=0)
    other, _ = sd.sample(PROMPTS[1:], [7], steps=3, guidance_scale=2.0)
    assert not torch.allclose(alone, other)


def test_bfloat16_runs_and_hands_back_float32(sd_dir, sd):
    half = StableDiffusionBackbone.load(str(sd_dir), dtype="bfloat16")
    assert half.unet.dtype == torch.bfloat16
    images, feats = half.sample(PROMPTS[:1], [5], steps=2, guidance_scale=2.0, capture_timestep=500)
    assert images.dtype == torch.float32 and feats is not None and all(m.dtype == torch.float32 for m in feats.maps)
    assert torch.isfinite(images).all()
    assert half.fingerprint() != sd.fingerprint()  # a bf16 run draws other samples


# -- the decoder and the stages on SD features ---------------------------------------------
def _sd_params(tmp_path: Path, sd_dir: Path):
    raw = tiny_raw(tmp_path, sd_dir)
    return params_from_dict(raw, source=str(tmp_path / "params.yaml"))


def test_decoder_trains_on_sd_features(sd, sd_dir, tmp_path):
    params = _sd_params(tmp_path, sd_dir)
    write_real_set(params.world, tmp_path / "set", 4, seed=7)
    labelled = load_real_set(tmp_path / "set", params.world.classes)
    cfg = params.decoder.__class__(**{**params.decoder.__dict__, "steps": 25})
    decoder, stats = train_decoder(sd, labelled, params.world.classes, cfg=cfg, bb=params.backbone)
    assert np.isfinite(stats["final_loss"]) and stats["final_loss"] < stats["first_loss"]
    assert decoder.config["map_channels"] == [64, 64, 32]


@pytest.mark.slow
def test_stages_end_to_end_with_stable_diffusion(sd_dir, tmp_path):
    p = _sd_params(tmp_path, sd_dir)
    assert isinstance(stages.load_backbone(p), StableDiffusionBackbone)
    stages.make_real_sets(p)
    stages.train_decoder_stage(p)
    stages.expand_prompts_stage(p)
    assert stages.generate_stage(p) == {"num_samples": 6, "shards": 2, "made": 6}
    stages.filter_stage(p)
    stages.export_stage(p)
    coco = COCO(f"{p.export.out}/annotations.json")
    assert len(coco.getImgIds()) == 6
    card = json.loads(Path(p.export.out, "dataset.json").read_text())
    assert card["counts"]["kept"] == 6
    records = json.loads(next(Path(p.generate.out).glob("shard-*/records.json")).read_text())
    assert records[0]["backbone"] == StableDiffusionBackbone.load(str(sd_dir)).fingerprint()


def test_img2img_starts_from_the_given_images(sd):
    """Regeneration (the filter's known-layout measurement) runs on SD too: it denoises only the
    last ``strength`` of the schedule, from the image's own latents, so a short tail stays nearer
    the image's VAE reconstruction than the whole schedule does."""
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recon = (sd.vae.decode(sd._encode(init) / sd.vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5).clamp(
            0, 1
        )
    calls = []
    hook = sd.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        near, _ = sd.sample(PROMPTS[:1], [5], steps=10, guidance_scale=2.0, init_images=init, strength=0.1)
        assert len(calls) == 1
        far, _ = sd.sample(PROMPTS[:1], [5], steps=10, guidance_scale=2.0, init_images=init, strength=1.0)
        assert len(calls) == 1 + 10
    finally:
        hook.remove()
    assert (near - recon).abs().mean() < (far - recon).abs().mean()
    plain, _ = sd.sample(PROMPTS[:1], [5], steps=10, guidance_scale=2.0)
    assert not torch.allclose(far, plain)  # even at strength 1 the image's latents are the start
