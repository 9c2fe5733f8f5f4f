"""The inspector: a segmenter the factory never learns from, used only to audit generated data.

In the real world one would audit a synthetic dataset with a strong, fully supervised
model. The shapes-world stand-in is a small U-Net trained on thousands of rendered
scenes with exact labels, drawn from its own seed range (never the labelled K images,
never the held-out test set). It reads an image as objects: the connected pieces of
its per-pixel classes, each coloured by the nearest palette colour of its pixels.

Nothing in training, filtering or prompt choice may import this module; only the
``inspect`` stage (``datasetdm.evaluate.backbone``) does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage
from tqdm import tqdm

from datasetdm.checkpoints import WEIGHTS_SHA256, verify_weights
from datasetdm.config import InspectConfig, WorldConfig
from datasetdm.downstream.data import ArraySet
from datasetdm.downstream.models import SmallUNet, to_input, train_model
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.semantic import confusion_matrix, semantic_metrics
from datasetdm.io import atomic_path, sha256_file
from datasetdm.worlds.shapes import COLOUR_RGB, render_scene

logger = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE = "inspector.json", "inspector.safetensors"
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
SPLIT_SHARE = 0.3  # a second class this strong inside one colour piece is a second object


@dataclasses.dataclass
class Inspector:
    """The segmenter plus the vocabulary it reads (class index 0 is background)."""

    model: SmallUNet
    classes: tuple[str, ...]
    colours: tuple[str, ...]
    min_area: int

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 class logits (N, 1 + C, H, W)."""
        out = [self.model(to_input(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32)

    def segment(self, images: np.ndarray, classes: tuple[str, ...] | None = None) -> np.ndarray:
        """Per-pixel labels (N, H, W) uint8; restricted to ``classes`` (renumbered 1..len) if given."""
        logits = self.logits(images)
        if classes is None:
            return logits.argmax(1).astype(np.uint8)
        keep = [0] + [1 + self.classes.index(c) for c in classes]
        return logits[:, keep].argmax(1).astype(np.uint8)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pooled bottleneck activations (N, D): the inspector's own notion of what an image holds."""
        m, out = self.model, []
        for i in range(0, len(images), batch_size):
            a = m.e1(to_input(images[i : i + batch_size]))
            c = m.e3(F.max_pool2d(m.e2(F.max_pool2d(a, 2)), 2))
            out.append(torch.cat([c.mean((2, 3)), c.amax((2, 3))], 1).numpy())
        return np.concatenate(out).astype(np.float64)

    def read_objects(self, image: np.ndarray, labels: np.ndarray) -> Counter:
        """The (shape, colour) objects in one image.

        An object is an 8-connected piece of foreground pixels of one palette colour (each
        pixel takes its nearest palette colour), of at least ``min_area`` pixels; its shape
        is the class most of its pixels are labelled, or, where two classes each hold at
        least ``SPLIT_SHARE`` of it, one object of each (two touching objects of one
        colour). Reading by colour first keeps an object whole where an occluder cuts into
        it and the segmenter's classes fray at the cut; two touching objects of one colour
        and one shape still read as one, a limit the rendered-scene ceiling in
        ``metrics/backbone.json`` shows.
        """
        palette = np.array([COLOUR_RGB[c] for c in self.colours], dtype=np.float64)
        foreground = labels > 0
        nearest = np.full(labels.shape, -1, dtype=np.int64)
        nearest[foreground] = (
            ((image[foreground].astype(np.float64)[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
        )
        found: Counter = Counter()
        for c, colour in enumerate(self.colours):
            pieces, n = ndimage.label(nearest == c, structure=EIGHT_CONNECTED)
            for j in range(1, n + 1):
                piece = pieces == j
                if piece.sum() < self.min_area:
                    continue
                votes = np.bincount(labels[piece], minlength=1 + len(self.classes))[1:]
                strong = np.flatnonzero(votes >= max(self.min_area, SPLIT_SHARE * votes.sum()))
                for k in strong if len(strong) else [int(votes.argmax())]:
                    found[(self.classes[k], colour)] += 1
        return found

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write config + weights as one folder; the config seals the weights with their sha256."""
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, tmp / WEIGHTS_FILE)
            meta = {
                "classes": list(self.classes),
                "colours": list(self.colours),
                "min_area": self.min_area,
                "width": self.model.e1[0].out_channels,
                **(extra or {}),
                WEIGHTS_SHA256: sha256_file(tmp / WEIGHTS_FILE),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Inspector":
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise DatasetDMError(
                path, "inspect.model", f"no inspector here (missing {CONFIG_FILE}); run `make inspector`"
            )
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            model = SmallUNet(1 + len(meta["classes"]), int(meta["width"]))
            model.load_state_dict(load_file(path / WEIGHTS_FILE))
        except (json.JSONDecodeError, KeyError, RuntimeError, OSError) as e:
            raise DatasetDMError(
                path, "inspect.model", f"not a usable inspector ({str(e).splitlines()[0][:200]})"
            ) from None
        verify_weights(
            path / WEIGHTS_FILE,
            meta.get(WEIGHTS_SHA256),
            config_file=path / CONFIG_FILE,
            remedy="run `make inspector`",
        )
        return cls(model.eval(), tuple(meta["classes"]), tuple(meta["colours"]), int(meta["min_area"]))


def render_set(world: WorldConfig, num: int, seed: int, desc: str) -> tuple[ArraySet, list[list[tuple[str, str]]]]:
    """``num`` rendered scenes from seeds ``seed``, ``seed + 1``, ... and their object lists."""
    images = np.empty((num, world.image_size, world.image_size, 3), dtype=np.uint8)
    semantic = np.empty((num, world.image_size, world.image_size), dtype=np.uint8)
    objects = []
    for i in tqdm(range(num), desc=desc, unit="img", mininterval=5):
        scene = render_scene(world, seed + i)
        images[i], semantic[i] = scene.image, scene.semantic
        objects.append([(o.shape, o.colour) for o in scene.objects])
    return ArraySet(images, semantic), objects


def inspector_world(world: WorldConfig, cfg: InspectConfig) -> WorldConfig:
    return dataclasses.replace(world, classes=cfg.classes)


def train_inspector(world: WorldConfig, cfg: InspectConfig) -> tuple[Inspector, dict]:
    """Train on ``cfg.train_images`` rendered scenes; report mIoU on ``cfg.num_test`` more (its own held-out seeds)."""
    iworld = inspector_world(world, cfg)
    train, _ = render_set(iworld, cfg.train_images, cfg.seed, "render inspector training scenes")
    model = train_model(
        "semantic",
        [train],
        num_labels=1 + len(cfg.classes),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        width=cfg.width,
        desc="train inspector",
    )
    inspector = Inspector(model, cfg.classes, world.colours, cfg.min_area)
    return inspector, held_out_quality(inspector, world, cfg)


def held_out_quality(inspector: Inspector, world: WorldConfig, cfg: InspectConfig) -> dict:
    """mIoU on rendered scenes of its own held-out seeds, and how often it reads exactly the scene's objects."""
    iworld = dataclasses.replace(world, classes=inspector.classes, colours=inspector.colours)
    test, objects = render_set(
        iworld, cfg.num_test, cfg.seed + cfg.train_images + 1_000_000, "render inspector test scenes"
    )
    labels = inspector.segment(test.images)
    conf = confusion_matrix(labels, test.semantic, 1 + len(inspector.classes))
    exact = [inspector.read_objects(img, lab) == Counter(obj) for img, lab, obj in zip(test.images, labels, objects)]
    stats = {
        "mIoU": semantic_metrics(conf, inspector.classes)["mIoU"],
        "reading_accuracy": float(np.mean(exact)),
        "num_test": len(test),
    }
    logger.info("inspector held-out mIoU %.4f, object reading accuracy %.4f", stats["mIoU"], stats["reading_accuracy"])
    return stats
