"""Downstream uplift machinery: data loading from an export and the small segmenter."""

from __future__ import annotations

import numpy as np
import pytest

from datasetdm.downstream.data import ArraySet, from_export
from datasetdm.downstream.segmenter import evaluate_segmenter, train_segmenter
from datasetdm.errors import DatasetDMError


def toy_set(n: int, seed: int) -> ArraySet:
    """Squares of label 1 (red) and 2 (blue) on grey: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 16, 16, 3), 128, np.uint8)
    labels = np.zeros((n, 16, 16), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, 8, size=2)
        k = int(rng.integers(1, 3))
        images[i, y:y + 8, x:x + 8] = (255, 0, 0) if k == 1 else (0, 0, 255)
        labels[i, y:y + 8, x:x + 8] = k
    return ArraySet(images, labels)


def test_segmenter_learns_and_mixes_sources():
    train, test = toy_set(32, 0), toy_set(16, 1)
    untrained = evaluate_segmenter(train_segmenter([train], 3, 1, 8, 0.0, 0, width=8), test, 3)
    trained = evaluate_segmenter(train_segmenter([train, toy_set(8, 2)], 3, 60, 8, 0.01, 0, width=8), test, 3)
    assert trained["mIoU"] > untrained["mIoU"] + 0.2 and trained["mIoU"] > 0.6
    assert len(trained["per_label_iou"]) == 3


def test_export_without_card_is_one_line(tmp_path):
    with pytest.raises(DatasetDMError) as e:
        from_export(tmp_path)
    assert "dataset.json" in str(e.value) and "\n" not in str(e.value)
