"""Backbones by name: ``params.yaml: backbone.kind`` -> the function that loads one.

A loader is a callable with one fixed signature,
``loader(cfg: BackboneConfig, *, source: str | None, output_device: str) -> Backbone``,
that returns something fulfilling ``datasetdm.backbones.base.Backbone`` with images and
features handed back on ``output_device``. Adding a backbone is one
``register_backbone("name", loader)``; an unknown ``kind`` is answered with the names
known (as detectron2's ``DatasetCatalog`` does), both when ``params.yaml`` is read and
when a backbone is loaded.

This module imports no torch or diffusers: reading ``params.yaml`` checks names only,
and a loader imports its model code when it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from datasetdm.errors import DatasetDMError

if TYPE_CHECKING:
    from datasetdm.backbones.base import Backbone
    from datasetdm.config import BackboneConfig

Loader = Callable[..., "Backbone"]


def _load_stable_diffusion(cfg: BackboneConfig, *, source: str | None, output_device: str) -> Backbone:
    """A diffusers SD 1.x/2.x folder (or cached hub id) at ``cfg.model``, offline."""
    from datasetdm.backbones.sd import StableDiffusionBackbone

    return StableDiffusionBackbone.load(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        output_device=output_device,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        source=source,
    )


_LOADERS: dict[str, Loader] = {"stable-diffusion": _load_stable_diffusion}


def register_backbone(kind: str, loader: Loader) -> None:
    """Make ``backbone.kind: <kind>`` load with ``loader`` (replacing any loader of that name)."""
    _LOADERS[kind] = loader


def known_backbones() -> tuple[str, ...]:
    """The ``backbone.kind`` values that load, in registration order."""
    return tuple(_LOADERS)


def check_kind(kind: str, source: str | None) -> None:
    """Raise the one-line ``DatasetDMError`` for a ``backbone.kind`` nothing is registered under."""
    if kind not in _LOADERS:
        raise DatasetDMError(source, "backbone.kind", f"unknown backbone {kind!r} (known: {', '.join(_LOADERS)})")


def load_backbone(cfg: BackboneConfig, *, source: str | None = None, output_device: str = "cpu") -> Backbone:
    """The backbone ``cfg.kind`` names, loaded from ``cfg.model``, handing results back on ``output_device``."""
    check_kind(cfg.kind, source)
    return _LOADERS[cfg.kind](cfg, source=source, output_device=output_device)
