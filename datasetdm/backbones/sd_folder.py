"""Finding, checking and loading a diffusers Stable Diffusion folder, offline.

Everything that can go wrong with user-supplied weights (no folder, a folder of
another pipeline, weights that do not match their config, components that do not
fit together) is turned into one ``DatasetDMError`` here, naming the path and saying
how to obtain weights, so ``StableDiffusionBackbone`` only ever sees loaded modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from datasetdm.errors import DatasetDMError

logger = logging.getLogger(__name__)
FIELD = "backbone.model"
HOW_TO_GET = (
    "set backbone.model to a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, "
    "tokenizer/, scheduler/), e.g. fetched elsewhere with `huggingface-cli download stable-diffusion-v1-5/"
    "stable-diffusion-v1-5 --local-dir DIR` and copied here, or written by StableDiffusionPipeline.save_pretrained"
)
# model_index.json entry -> the classes we can run it with.
EXPECTED = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_folder(model: str) -> Path:
    """A local folder as is; a hub id only if it is already in the Hugging Face cache (never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _HUB_ID.match(model) and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            found = Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise DatasetDMError(
                model,
                FIELD,
                f"no such folder, and hub id {model!r} is not in the local Hugging Face cache "
                f"(downloads are off); {HOW_TO_GET}",
            ) from None
        logger.info("backbone.model %r: no such folder, using the hub id's cached snapshot %s", model, found)
        return found
    raise DatasetDMError(path, FIELD, f"no such folder; {HOW_TO_GET}")


def check_model_index(folder: Path) -> None:
    """Reject folders that are not a Stable Diffusion (1.x/2.x-style) pipeline before loading anything."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise DatasetDMError(index, FIELD, f"missing: not a diffusers pipeline folder; {HOW_TO_GET}")
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetDMError(index, FIELD, f"not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise DatasetDMError(index, FIELD, "not a diffusers model index (expected a JSON object)")
    for name, classes in EXPECTED.items():
        entry = entries.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise DatasetDMError(
                index,
                name,
                f"no {name} component ({entries.get('_class_name', 'unknown pipeline')} "
                f"is not a Stable Diffusion pipeline); {HOW_TO_GET}",
            )
        if classes is not None and entry[1] not in classes:
            raise DatasetDMError(
                index, name, f"wrong architecture: {entry[1]} (the SD backbone runs {' or '.join(classes)})"
            )
        if not (folder / name).is_dir():
            raise DatasetDMError(folder / name, FIELD, f"component folder missing; {HOW_TO_GET}")


def load_components(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Load unet, vae, text_encoder, tokenizer and a DDIM scheduler (on the CPU, in ``dtype``)."""
    loaders: dict[str, Any] = {
        # low_cpu_mem_usage=False says outright what diffusers falls back to without accelerate
        # (instead of a warning on stderr every load).
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            folder,
            subfolder="unet",
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            low_cpu_mem_usage=False,
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(
            folder,
            subfolder="vae",
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            low_cpu_mem_usage=False,
        ),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", dtype=dtype, local_files_only=True, use_safetensors=True
        ),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        # SD folders ship PNDM or other schedulers; DDIM reads the same beta schedule from their config.
        "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    }
    out = {}
    transformers_logging.disable_progress_bar()  # one error line, not a loading bar, when a stage fails after loading
    for name, load in loaders.items():
        try:
            out[name] = load()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise DatasetDMError(
                folder / name,
                FIELD,
                f"cannot load {name} (wrong architecture or damaged weights: {first[:300]}); {HOW_TO_GET}",
            ) from None
    check_fit(folder, out)
    return out


def check_fit(folder: Path, parts: dict[str, Any]) -> None:
    """The components must fit together as SD's do (one latent space, one text width, no extra conditioning)."""
    unet, vae, text = parts["unet"].config, parts["vae"].config, parts["text_encoder"].config
    if unet.in_channels != vae.latent_channels:
        raise DatasetDMError(
            folder / "unet" / "config.json",
            "in_channels",
            f"wrong architecture: UNet takes {unet.in_channels} channels, VAE latents have {vae.latent_channels}",
        )
    if unet.cross_attention_dim != text.hidden_size:
        raise DatasetDMError(
            folder / "unet" / "config.json",
            "cross_attention_dim",
            f"wrong architecture: {unet.cross_attention_dim}, but the text encoder emits {text.hidden_size}",
        )
    if (
        unet.addition_embed_type is not None
        or unet.time_cond_proj_dim is not None
        or unet.class_embed_type is not None
    ):
        raise DatasetDMError(
            folder / "unet" / "config.json",
            "addition_embed_type",
            "wrong architecture: this UNet needs extra conditioning (SDXL, LCM or upscaler); "
            "the SD backbone runs text-conditioned SD 1.x/2.x UNets",
        )
    if not isinstance(unet.sample_size, int):
        raise DatasetDMError(
            folder / "unet" / "config.json",
            "sample_size",
            f"must be one integer (square latents), got {unet.sample_size!r}",
        )


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the configs, tokenizer files and the weight files ``from_pretrained`` reads.

    Variant files (``*.fp16.safetensors``) are skipped: they are not what was loaded.
    """
    digest = hashlib.sha256()
    files = [folder / "model_index.json"]
    for name in EXPECTED:
        files += sorted(f for f in (folder / name).iterdir() if f.is_file() and _hashed(f))
    for f in files:
        digest.update(str(f.relative_to(folder)).encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# Written by pretraining beside the pipeline: its log and the folder's fingerprint at the
# moment it was written (the seal every later load checks).
PRETRAIN_LOG = "pretrain_log.json"


def check_seal(folder: Path) -> None:
    """Stop with one line if a folder pretraining sealed no longer has the files it wrote.

    A folder without a seal (any SD folder a user brings) is loaded as it is; a sealed
    one (the embedded model) must hash as recorded, so a weight or config edited or
    damaged since is never silently used to draw and label a dataset. Cost: one read
    of the weights (29 MB for the embedded model), which loading does anyway.
    """
    log = folder / PRETRAIN_LOG
    if not log.is_file():
        return
    try:
        recorded = json.loads(log.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        raise DatasetDMError(log, None, "not a readable JSON object; run make pretrain") from None
    if recorded is None:
        return
    if folder_fingerprint(folder) != recorded:
        raise DatasetDMError(
            folder,
            f"{PRETRAIN_LOG}: fingerprint",
            "its weights, configs or tokenizer changed since pretraining wrote it; restore the folder "
            "(git checkout, for the embedded model) or run make pretrain",
        )


def _hashed(f: Path) -> bool:
    if f.suffix in (".json", ".txt"):
        return True
    return f.suffix in (".safetensors", ".bin") and "." not in f.stem
