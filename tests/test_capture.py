"""Feature capture on a tiny real diffusers UNet."""

import torch

from datasetdm.backbones.tiny_sd import build_sd_components, tiny_sd_configs
from datasetdm.capture import FeatureCapture

PROMPTS = ["a red circle", "two blue squares and a red circle"]


def test_capture_shapes_and_attention_is_a_distribution(tiny_backbone):
    feats = tiny_backbone.extract_features(torch.rand(2, 3, 32, 32), PROMPTS, 100, [1, 2])
    # up blocks coarse -> fine over the 8x8 latent of a 32 px image (VAE x4)
    assert [m.shape[-1] for m in feats.maps] == [2, 4, 8]
    assert all(m.shape[0] == 2 for m in feats.maps)
    assert feats.attention.shape == (2, 77, 8, 8)  # CLIP's 77 tokens, at the finest cross-attention level
    torch.testing.assert_close(feats.attention.sum(1), torch.ones(2, 8, 8))


def test_capture_leaves_the_unet_as_it_was():
    unet = build_sd_components(tiny_sd_configs())["unet"]  # a fresh one: a backbone keeps its capture installed
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    hooks_before = sum(len(m._forward_hooks) for m in unet.modules())
    with FeatureCapture(unet):
        assert any("Capturing" in type(v).__name__ for v in unet.attn_processors.values())
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks_before


def test_capturing_does_not_change_the_samples(tiny_backbone):
    plain, none = tiny_backbone.sample(PROMPTS, [5, 6], steps=4, guidance_scale=2.0, capture_timestep=None)
    captured, feats = tiny_backbone.sample(PROMPTS, [5, 6], steps=4, guidance_scale=2.0, capture_timestep=500)
    assert none is None and feats is not None
    torch.testing.assert_close(plain, captured, atol=1e-4, rtol=0)
    assert feats.attention.shape[0] == 2  # only the conditional half of the CFG batch


def test_samples_depend_on_their_own_seed_only(tiny_backbone):
    pair, _ = tiny_backbone.sample(PROMPTS, [5, 6], steps=3, guidance_scale=2.0)
    alone, _ = tiny_backbone.sample(PROMPTS[1:], [6], steps=3, guidance_scale=2.0)
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)
    other, _ = tiny_backbone.sample(PROMPTS[1:], [7], steps=3, guidance_scale=2.0)
    assert not torch.allclose(alone, other)
