"""The perception decoder (P-Decoder): one trunk over captured features, many heads.

Trunk: an FPN over the UNet decoder maps (coarse to fine), the per-class attention
maps joined at the finest feature resolution, then upsampling to image resolution.
The generated image itself can be joined at full resolution (``image_skip``): UNet
features live on a grid 4-8x coarser than the pixels, and the image supplies the
exact edges a mask needs. Built from a plain config dict; saved as safetensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from datasetdm.checkpoints import WEIGHTS_SHA256, load_weights, verify_weights
from datasetdm.decoder.heads import HEADS
from datasetdm.errors import DatasetDMError
from datasetdm.io import atomic_path, sha256_file

CONFIG_FILE, WEIGHTS_FILE = "config.json", "decoder.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class PDecoder(nn.Module):
    """config keys: map_channels (list, coarse->fine), classes (list), channels, image_skip, heads, image_size."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        d = int(config["channels"])
        num_classes = len(config["classes"])
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in config["map_channels"])
        self.smooth = nn.ModuleList(_block(d, d) for _ in config["map_channels"])
        self.fuse = _block(d + num_classes, d)
        self.up1 = _block(d, d // 2)
        skip = 16 if config["image_skip"] else 0
        self.stem = _block(3, skip) if skip else None
        self.up2 = _block(d // 2 + skip, d // 2)
        # A decoder saved before a key existed was built without that option: the default False.
        options = {
            "depth": {
                "coords": bool(config.get("depth_coords", False)),
                "background_prior": bool(config.get("depth_background_prior", False)),
            }
        }
        self.heads = nn.ModuleDict(
            {name: HEADS[name](d // 2, num_classes, **options.get(name, {})) for name in config["heads"]}
        )

    @property
    def class_source(self) -> str:
        """How its labels name the object pixels (``decoder.class_source``; a decoder saved before the key
        existed took its own argmax)."""
        return self.config.get("class_source", "decoder")

    def depth_labels(self, metres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The depth maps (B, H, W) to store for images whose class ids are ``labels``
        (``DepthHead.depth_labels``)."""
        return self.heads["depth"].depth_labels(metres, labels)

    def trunk(self, maps: list[torch.Tensor], attention: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = None
        for lat, smooth, m in zip(self.lateral, self.smooth, maps):
            y = lat(m)
            if x is not None:
                y = y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
            x = smooth(y)
        assert x is not None
        att = F.interpolate(attention, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, att], 1))
        size = image.shape[-2:]
        x = self.up1(F.interpolate(x, size=(size[0] // 2, size[1] // 2), mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.stem is not None:
            x = torch.cat([x, self.stem(image * 2 - 1)], 1)
        return self.up2(x)

    def forward(
        self, maps: list[torch.Tensor], attention: torch.Tensor, image: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """maps: backbone features coarse->fine; attention: (B, C, h, w) per class; image: (B, 3, H, W) in [0, 1]."""
        x = self.trunk(maps, attention, image)
        return {name: head(x) for name, head in self.heads.items()}

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write config + weights as one folder; the config seals the weights with their sha256."""
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / WEIGHTS_FILE)
            config = {**self.config, **(extra or {}), WEIGHTS_SHA256: sha256_file(tmp / WEIGHTS_FILE)}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PDecoder":
        path = Path(path)
        cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_file.is_file() or not weights.is_file():
            raise DatasetDMError(
                path,
                "decoder.out",
                f"no trained decoder here (need {CONFIG_FILE} and {WEIGHTS_FILE}); run the train-decoder stage",
            )
        try:
            config = json.loads(cfg_file.read_text())
            # The seal describes the file, not the model: kept out of ``config`` so
            # ``fingerprint`` (recorded in every generated sample) does not change with it.
            recorded = config.pop(WEIGHTS_SHA256, None)
            model = cls(config)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetDMError(cfg_file, None, f"not a decoder config ({e})") from None
        load_weights(weights, model, CONFIG_FILE)
        verify_weights(weights, recorded, config_file=cfg_file, remedy="run the train-decoder stage")
        return model.eval()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
