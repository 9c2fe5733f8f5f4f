"""Random-weight Stable Diffusion pipelines built from configs, saved as a diffusers folder.

No SD weights can be downloaded here, yet the SD backbone must be exercised through
its real loading path (``from_pretrained`` on a pipeline folder). So tests and the
overhead benchmark build the same five components SD ships (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIM scheduler config) from small
configs and save them with ``StableDiffusionPipeline.save_pretrained``. The tokenizer
is a real CLIP BPE tokenizer over a tiny vocabulary: every letter (so any lowercase
word encodes, as with CLIP's byte-level BPE), plus merges that make the shapes-world
words whole tokens. Merges interact as in real BPE, so some words ("green") still
split into several tokens, which is the case ``token_positions`` must handle.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from datasetdm.config import COLOURS, SHAPES
from datasetdm.worlds.shapes import NUMBER_WORDS, PLURAL

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Everything a shapes-world caption or a simple template can say.
WORDS: tuple[str, ...] = (
    *NUMBER_WORDS,
    "and",
    *COLOURS,
    *SHAPES,
    *PLURAL.values(),
    "photo",
    "of",
    "on",
    "the",
    "picture",
)
# The scheduler SD 1.x ships (PNDM there; DDIM reads the same betas), steps_offset=1 as in SD.
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def clip_bpe(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary (token -> id) and merge list covering ``words``.

    Each word is merged left to right into one end-of-word token ("circle</w>").
    """
    letters = list(string.ascii_lowercase + string.digits)
    vocab = [BOS, EOS] + letters + [c + "</w>" for c in letters]
    merges: list[str] = []
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            left += right
            if left not in vocab:
                vocab.append(left)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str | Path, words: tuple[str, ...] = WORDS, max_length: int = 77) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json the way SD 1.x folders hold them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_sd_configs(image_size: int = 32) -> dict[str, dict[str, Any]]:
    """Configs of a ~1M-parameter SD: VAE downsampling x4, UNet over an (image/4)^2 latent.

    The UNet keeps SD's layout in miniature: cross-attention at the two finer levels,
    none at the coarsest, so its up blocks start with a plain ``UpBlock2D``.
    """
    vocab, _ = clip_bpe()
    return {
        "unet": {
            "sample_size": image_size // 4,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
        "vae": {
            "sample_size": image_size,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [16, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 16,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
        },
        "text_encoder": {
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab[BOS],
            "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS],
        },
        "scheduler": dict(SD_SCHEDULER),
    }


def sd15_shaped_configs() -> dict[str, dict[str, Any]]:
    """SD 1.5's own architecture (860M-parameter UNet at 64x64 latents, 512 px, ViT-L text encoder)."""
    vocab, _ = clip_bpe()
    return {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {
            "sample_size": 512,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        # SD's vocabulary is 49,408 tokens; ours uses the first few ids of the same table size.
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": vocab[BOS],
            "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS],
        },
        "scheduler": dict(SD_SCHEDULER),
    }


def build_sd_components(configs: dict[str, dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Random-weight modules (deterministic per seed), a CLIP tokenizer and a DDIM scheduler."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, max_length=configs["text_encoder"]["max_position_embeddings"])
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return {
        "unet": UNet2DConditionModel(**configs["unet"]).eval(),
        "vae": AutoencoderKL(**configs["vae"]).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval(),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**configs["scheduler"]),
    }


def save_sd_folder(components: dict[str, Any], folder: str | Path) -> Path:
    """Save components as a diffusers StableDiffusionPipeline folder (safetensors), like a hub snapshot."""
    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves tokenizer.json only; SD 1.x folders hold vocab.json + merges.txt.
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    write_clip_tokenizer(folder / "tokenizer", max_length=components["tokenizer"].model_max_length)
    return folder


def build_tiny_sd(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Build a tiny random-weight SD pipeline folder at ``folder`` (seconds on a CPU)."""
    return save_sd_folder(build_sd_components(tiny_sd_configs(image_size), seed), folder)
