"""A small standard segmenter, trained the same way on real, synthetic or mixed data.

The model is deliberately ordinary (a 3-level U-Net, torch only): the question is
what the training data is worth, not how clever the model is. Every run uses the
same architecture, steps, batch size and seed; only the data differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from datasetdm.downstream.data import ArraySet
from datasetdm.evaluate.semantic import confusion_matrix, iou_from_confusion


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


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


def _batch(data: ArraySet, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch with random dihedral views (labels are invariant to them)."""
    imgs, labs = [], []
    for i in idx:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        img, lab = np.rot90(data.images[i], k), np.rot90(data.semantic[i], k)
        if flip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        imgs.append(img)
        labs.append(lab)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs))).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.ascontiguousarray(np.stack(labs))).long()


def train_segmenter(sources: list[ArraySet], num_labels: int, steps: int, batch_size: int, lr: float, seed: int,
                    width: int = 24, desc: str = "segmenter") -> SmallUNet:
    """Train on ``sources``; each batch draws equally from every source (so 20 real
    images are not drowned by 2,000 synthetic ones)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallUNet(num_labels, width).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_source = [batch_size // len(sources) + (1 if k < batch_size % len(sources) else 0) for k in range(len(sources))]
    for step in tqdm(range(steps), desc=desc, unit="step", mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        xs, ys = zip(*(_batch(src, rng.integers(0, len(src), size=n), rng) for src, n in zip(sources, per_source) if n))
        logits = model(torch.cat(xs))
        loss = F.cross_entropy(logits, torch.cat(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def evaluate_segmenter(model: SmallUNet, test: ArraySet, num_labels: int, batch_size: int = 64) -> dict:
    conf = np.zeros((num_labels, num_labels), dtype=np.int64)
    for start in range(0, len(test), batch_size):
        x = torch.from_numpy(test.images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = model(x).argmax(1).numpy()
        conf += confusion_matrix(pred, test.semantic[start:start + batch_size], num_labels)
    iou = iou_from_confusion(conf)
    return {"mIoU": float(np.nanmean(iou)), "per_label_iou": [None if np.isnan(v) else float(v) for v in iou]}
