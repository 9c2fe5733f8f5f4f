"""Saving, loading and validating the toy backbone."""

import json
import shutil

import pytest
import torch

from datasetdm.backbones.toy import ToyBackbone, toy_config
from datasetdm.errors import DatasetDMError

from conftest import build_tiny_backbone


def test_save_load_roundtrip(tmp_path):
    model = build_tiny_backbone()
    model.save(tmp_path / "bb")
    loaded = ToyBackbone.load(tmp_path / "bb")
    assert loaded.fingerprint() == model.fingerprint()
    a, _ = model.sample(["a red circle"], [3], 2, 2.0)
    b, _ = loaded.sample(["a red circle"], [3], 2, 2.0)
    torch.testing.assert_close(a, b)


def test_shipped_backbone_loads():
    from conftest import REPO
    model = ToyBackbone.load(REPO / "datasetdm/assets/toy-backbone")
    assert model.image_size == 64
    assert model.config["unet"]["block_out_channels"][0] >= model.codec.latent_channels()


def test_missing_dir_names_the_param(tmp_path):
    with pytest.raises(DatasetDMError, match=r"backbone.path: no toy backbone here"):
        ToyBackbone.load(tmp_path / "nothing")


def test_truncated_weights(tiny_backbone_dir, tmp_path):
    bad = tmp_path / "bb"
    shutil.copytree(tiny_backbone_dir, bad)
    data = (bad / "unet.safetensors").read_bytes()
    (bad / "unet.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetDMError, match=r"unet.safetensors: not a readable safetensors file"):
        ToyBackbone.load(bad)


def test_pickle_instead_of_safetensors_is_refused(tiny_backbone_dir, tmp_path):
    bad = tmp_path / "bb"
    shutil.copytree(tiny_backbone_dir, bad)
    torch.save(ToyBackbone.load(tiny_backbone_dir).unet.state_dict(), bad / "unet.safetensors")
    with pytest.raises(DatasetDMError, match="not a readable safetensors file"):
        ToyBackbone.load(bad)


def test_wrong_architecture(tiny_backbone_dir, tmp_path):
    bad = tmp_path / "bb"
    shutil.copytree(tiny_backbone_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    other = toy_config(image_size=32, block_out_channels=(16, 48), text_dim=16, text_layers=1)
    cfg["unet"] = other["unet"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DatasetDMError, match="wrong architecture"):
        ToyBackbone.load(bad)


@pytest.mark.parametrize("prompt, words", [("a red dragon", "unknown word 'dragon'"), ("   ", "empty prompt")])
def test_bad_prompts(tiny_backbone, prompt, words):
    with pytest.raises(DatasetDMError, match=words):
        tiny_backbone.validate_prompt(prompt)


def test_a_few_pretraining_steps_lower_the_loss(tmp_path):
    from datasetdm.backbones.pretrain import pretrain
    from datasetdm.config import params_from_dict

    params = params_from_dict({
        "world": {"image_size": 32},
        "pretrain": {"pool_size": 64, "steps": 30, "batch_size": 8, "block_out_channels": [48, 48], "text_dim": 16, "lr": 0.002},
    })
    stats = pretrain(params, out=tmp_path / "bb", preview=False)
    assert stats["final_loss"] < stats["first_loss"]
    assert ToyBackbone.load(tmp_path / "bb").config["unet"]["block_out_channels"] == [48, 48]
