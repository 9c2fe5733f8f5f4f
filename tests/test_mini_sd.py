"""Pretraining the embedded miniature Stable Diffusion: a real diffusers pipeline folder, resumable to the same
weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from datasetdm.backbones.pretrain_sd import pretrain_sd, snapshots, work_dir
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.sd_folder import folder_fingerprint
from datasetdm.config import Params, params_from_dict
from datasetdm.errors import DatasetDMError

pytestmark = pytest.mark.slow


def tiny_pretrain(tmp_path: Path, name: str, **over) -> dict:
    cfg = {
        "out": str(tmp_path / name / "mini-sd"),
        "pool_size": 48,
        "steps": 6,
        "batch_size": 4,
        "checkpoint_every": 3,
        "block_out_channels": [48, 32, 32],
        "text_dim": 16,
        "text_layers": 1,
        "max_length": 16,
        "vae": {
            "steps": 4,
            "batch_size": 4,
            "block_out_channels": [16, 16, 16],
            "decoder_steps": 3,
            "decoder_sharpen_steps": 2,
            "decoder_sharpen_batch_size": 4,
        },
        **over,
    }
    return {"world": {"image_size": 32}, "pretrain": cfg}


def assert_same_weights(*runs: Params) -> None:
    """The pipeline folders two pretraining runs wrote hold bit-identical UNet, text-encoder and VAE weights."""
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        a, b = (load_file(Path(p.pretrain.out) / f"{part}.safetensors") for p in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_pretrain_writes_a_pipeline_stable_diffusion_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    params = params_from_dict(tiny_pretrain(tmp_path, "a"), source="test")
    result = pretrain_sd(params, preview=False)
    out = Path(params.pretrain.out)
    assert result["steps"] == 6 and result["scaling_factor"] > 0
    assert not list(out.rglob("*.bin")) and len(list(out.rglob("*.safetensors"))) == 3  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor == pytest.approx(result["scaling_factor"])
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3)
    backbone = StableDiffusionBackbone.load(str(out))  # and the factory's own loader
    images, features = backbone.sample(["a blue star"], [1], steps=2, guidance_scale=2.0, capture_timestep=500)
    assert images.shape == (1, 3, 32, 32) and features is not None and features.attention.shape[0] == 1
    assert [step for step, _ in snapshots(params)] == [3, 6]
    written = json.loads((out / "pretrain_log.json").read_text())
    assert [row["step"] for row in written["log"]] == [3, 6]
    assert written["fingerprint"] == folder_fingerprint(out)  # the seal every load checks


def test_stopped_and_resumed_pretraining_gives_the_weights_of_an_unbroken_run(tmp_path):
    unbroken = params_from_dict(tiny_pretrain(tmp_path, "unbroken"), source="test")
    pretrain_sd(unbroken, preview=False)
    split = params_from_dict(tiny_pretrain(tmp_path, "split"), source="test")
    stopped = pretrain_sd(split, preview=False, until_step=4)
    assert stopped["stopped_at"] == 4 and not Path(split.pretrain.out).exists()
    assert (work_dir(split) / "unet-state" / "meta.json").is_file()
    pretrain_sd(split, preview=False)
    assert_same_weights(unbroken, split)
    assert [s for s, _ in snapshots(split)] == [s for s, _ in snapshots(unbroken)] == [3, 6]
    with pytest.raises(ValueError, match="until_step"):
        pretrain_sd(split, preview=False, until_step=0)


def test_a_decoder_sharpening_pass_changes_the_vae_decoder_alone(tmp_path):
    """Adding the second decoder pass to a finished run reuses every checkpoint before it: the encoder (so the
    latents the UNet learned) and the UNet stay bit for bit, only the VAE decoder moves."""
    vae = tiny_pretrain(tmp_path, "run")["pretrain"]["vae"]
    first = params_from_dict(tiny_pretrain(tmp_path, "run", vae={**vae, "decoder_sharpen_steps": 0}), source="test")
    pretrain_sd(first, preview=False)
    out = Path(first.pretrain.out)
    before = {
        part: load_file(out / f"{part}.safetensors")
        for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model")
    }
    pretrain_sd(params_from_dict(tiny_pretrain(tmp_path, "run"), source="test"), preview=False)
    assert (work_dir(first) / "vae-decoder-sharpen" / "meta.json").is_file()
    unet = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[k], before["unet/diffusion_pytorch_model"][k]) for k in unet)
    old, new = before["vae/diffusion_pytorch_model"], load_file(out / "vae/diffusion_pytorch_model.safetensors")
    moved = {k for k in new if not torch.equal(new[k], old[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)


def test_lr_scales_hold_a_prefix_at_its_own_rate_and_refuse_a_prefix_that_names_nothing(tmp_path):
    """A warm start's new layers may learn at a rate of their own (``scripts/attention_finetune.py``): here a scale
    of 0 keeps one block exactly where it started while every other layer moves."""
    from datasetdm.backbones.pretrain_sd import build_components, encode_pool, render_pool, train_unet

    params = params_from_dict(tiny_pretrain(tmp_path, "scaled"), source="test")
    components = build_components(params)
    images, captions = render_pool(params, 8, 0)
    means, stds = encode_pool(components["vae"], images, torch.device("cpu"))
    start = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    kw = {"means": means, "stds": stds, "captions": captions, "device": torch.device("cpu"), "until_step": 2}
    held = "down_blocks.0."
    train_unet(params, components, work=tmp_path / "work", lr_scales={held: 0.0}, **kw)
    now = components["unet"].state_dict()
    assert all(torch.equal(now[k], start[k]) for k in now if k.startswith(held))
    assert any(not torch.equal(now[k], start[k]) for k in now if not k.startswith(held))
    with pytest.raises(ValueError, match="no_such_block"):
        train_unet(params, components, work=tmp_path / "other", lr_scales={"no_such_block.": 2.0}, **kw)


def test_a_checkpoint_carried_in_parts_resumes_to_the_unbroken_weights_and_a_changed_part_is_refused(tmp_path):
    """A pretraining run longer than a session goes on elsewhere from the parts ``export_state`` writes (each
    under git hosts' 100 MB limit): rebuilt, it resumes exactly; a part changed in transit is not resumed from."""
    from datasetdm.backbones.pretrain_sd import export_state, import_state

    unbroken = params_from_dict(tiny_pretrain(tmp_path, "unbroken"), source="test")
    pretrain_sd(unbroken, preview=False)
    split = params_from_dict(tiny_pretrain(tmp_path, "split"), source="test")
    pretrain_sd(split, preview=False, until_step=4)
    state = work_dir(split) / "unet-state"
    parts = export_state(state, tmp_path / "carried")
    assert {"unet", "ema_unet", "opt-exp_avg", "opt-exp_avg_sq"} <= set(parts)
    shutil.rmtree(state)
    assert import_state(tmp_path / "carried", state) == 4
    pretrain_sd(split, preview=False)
    a, b = (load_file(Path(p.pretrain.out) / "unet/diffusion_pytorch_model.safetensors") for p in (unbroken, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema = tmp_path / "carried" / "ema_unet.safetensors"
    tensors = load_file(ema)
    first = next(iter(tensors))
    save_file({**tensors, first: tensors[first] + 1}, ema)
    with pytest.raises(DatasetDMError, match="sha256"):
        import_state(tmp_path / "carried", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_a_unet_pretrained_on_a_finished_folders_vae_is_the_one_trained_beside_that_vae(tmp_path):
    """``vae_from`` skips the VAE stages yet gives the UNet the very latents it had (same encoder, same scaling
    factor), so a run carried to another machine, where retrained VAE checkpoints could differ, ends bit for bit
    where it would have; a folder whose VAE has another shape, or no VAE, is refused by name."""
    first = params_from_dict(tiny_pretrain(tmp_path, "first"), source="test")
    made = pretrain_sd(first, preview=False)
    again = params_from_dict(tiny_pretrain(tmp_path, "again"), source="test")
    result = pretrain_sd(again, preview=False, vae_from=first.pretrain.out)
    assert result["scaling_factor"] == made["scaling_factor"]
    assert not (work_dir(again) / "vae").exists()  # no VAE stage ran
    assert_same_weights(first, again)
    vae = tiny_pretrain(tmp_path, "x")["pretrain"]["vae"]
    other = params_from_dict(tiny_pretrain(tmp_path, "other", vae={**vae, "block_out_channels": [32, 16, 16]}), "test")
    with pytest.raises(DatasetDMError, match=r"vae: .*shape .*not this config's VAE"):
        pretrain_sd(other, preview=False, vae_from=first.pretrain.out)
    with pytest.raises(DatasetDMError, match="no VAE there"):
        pretrain_sd(again, preview=False, vae_from=tmp_path / "nowhere")
