"""Small standard downstream models, trained the same way on real, synthetic or mixed data.

Each task gets a deliberately ordinary model (a 3-level U-Net, torch only): the
question is what the training data is worth, not how clever the model is. Every run
of a task uses the same architecture, steps, batch size and seed; only the data differ.

Tasks and their outputs:

* ``semantic``: 1 + C class logits, cross-entropy. Its connected components are also
  the instance predictions (the same grouping the P-Decoder's instances use).
* ``depth``: log-depth, the P-Decoder's depth loss; trained with horizontal flips only
  (the ground plane recedes upwards, a rotated view would teach otherwise).
* ``keypoints``: 1 + C class logits (to find instances) + centre/corner heatmaps,
  cross-entropy + the heatmap focal loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from datasetdm.config import DownstreamConfig
from datasetdm.decoder.heads import DepthHead
from datasetdm.decoder.train import view
from datasetdm.downstream.data import ArraySet
from datasetdm.keypoints import focal_loss

TASKS = ("semantic", "depth", "keypoints")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    def __init__(self, out_channels: int, width: int = 24) -> None:
        super().__init__()
        w = width
        self.e1, self.e2, self.e3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.d2, self.d1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.e3(F.max_pool2d(b, 2))
        b = self.d2(torch.cat([F.interpolate(c, scale_factor=2.0), b], 1))
        return self.out(self.d1(torch.cat([F.interpolate(b, scale_factor=2.0), a], 1)))


def out_channels(task: str, num_labels: int) -> int:
    return {"semantic": num_labels, "depth": 1, "keypoints": num_labels + 2}[task]


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _view_index(task: str, rng: np.random.Generator) -> int:
    """A random dihedral view (``decoder.train.view``) for labels that do not care (classes,
    class-agnostic keypoints); for depth only the identity or the flip (the ground recedes upwards)."""
    quarter_turns = 0 if task == "depth" else int(rng.integers(4))
    return 2 * quarter_turns + int(rng.integers(2))


def _batch(
    task: str, data: ArraySet, idx: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    imgs, sems, depths, heats = [], [], [], []
    for i in idx:
        v = _view_index(task, rng)
        imgs.append(view(data.images[i], v))
        sems.append(view(data.semantic[i], v))
        if task == "depth":
            depths.append(view(data.depth[i], v))
        if task == "keypoints":
            heats.append(view(data.heatmaps[i].transpose(1, 2, 0), v).transpose(2, 0, 1))
    targets = {"semantic": torch.from_numpy(np.stack(sems)).long()}
    if depths:
        targets["depth"] = torch.from_numpy(np.stack(depths))
    if heats:
        targets["keypoints"] = torch.from_numpy(np.stack(heats))
    return to_input(np.stack(imgs)), targets


def task_loss(task: str, out: torch.Tensor, targets: dict[str, torch.Tensor], num_labels: int) -> torch.Tensor:
    if task == "depth":
        return DepthHead.loss(out[:, 0], targets["depth"])
    ce = F.cross_entropy(out[:, :num_labels], targets["semantic"])
    if task == "semantic":
        return ce
    return ce + focal_loss(out[:, num_labels:], targets["keypoints"])


def usable(task: str, data: ArraySet) -> bool:
    """Whether ``data`` has the labels ``task`` trains on."""
    return {"semantic": True, "depth": data.depth is not None, "keypoints": data.heatmaps is not None}[task]


def colour_jitter(x: torch.Tensor, rng: np.random.Generator, strength: float = 0.2) -> torch.Tensor:
    """Per-image, per-channel gain and offset on inputs in [-1, 1]: colour is not what any task's label depends on."""
    gain = torch.from_numpy(1 + strength * rng.uniform(-1, 1, size=(len(x), 3, 1, 1))).float()
    offset = torch.from_numpy(0.5 * strength * rng.uniform(-1, 1, size=(len(x), 3, 1, 1))).float()
    return (x * gain + offset).clamp(-1, 1)


def train_model(
    task: str,
    sources: list[ArraySet],
    *,
    num_labels: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    width: int = 24,
    desc: str | None = None,
    jitter: bool = False,
) -> SmallUNet:
    """Train the ``task`` model on ``sources``; each batch draws equally from every source
    (so 20 real images are not drowned by 2,000 synthetic ones). ``jitter`` adds colour jitter
    to the dihedral views every batch gets."""
    if task not in TASKS:
        raise ValueError(f"unknown downstream task {task!r}")
    if not all(usable(task, s) for s in sources):
        raise ValueError(f"a training source lacks {task} labels")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallUNet(out_channels(task, num_labels), width).train()
    if task == "keypoints":  # heatmaps start at p = 0.1 everywhere (CenterNet's prior), as the P-Decoder's do
        with torch.no_grad():
            model.out.bias[num_labels:] = -2.19
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_source = [
        batch_size // len(sources) + (1 if k < batch_size % len(sources) else 0) for k in range(len(sources))
    ]
    for step in tqdm(range(steps), desc=desc or task, unit="step", mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        parts = [_batch(task, src, rng.integers(0, len(src), size=n), rng) for src, n in zip(sources, per_source) if n]
        x = torch.cat([p[0] for p in parts])
        if jitter:
            x = colour_jitter(x, rng)
        targets = {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}
        loss = task_loss(task, model(x), targets, num_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_audit_model(
    task: str,
    sources: list[ArraySet],
    cfg: DownstreamConfig,
    *,
    num_labels: int,
    seed: int,
    desc: str,
    steps: int | None = None,
) -> SmallUNet:
    """``train_model`` with the audit's recipe (``downstream``: batch, lr, width, colour jitter), so every
    arm, round and study trains the same way; ``steps`` where it differs from ``cfg.steps``."""
    return train_model(
        task,
        sources,
        num_labels=num_labels,
        steps=steps or cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        width=cfg.width,
        desc=desc,
        jitter=cfg.colour_jitter,
    )
