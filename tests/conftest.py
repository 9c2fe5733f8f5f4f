"""Shared fixtures: tiny real components built from config (no trained weights needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.tiny_sd import build_tiny_sd
from datasetdm.config import SHAPES, Params, params_from_dict
from datasetdm.downstream.models import SmallUNet
from datasetdm.evaluate.inspector import Inspector

REPO = Path(__file__).resolve().parents[1]
TINY_INSPECTOR = "tiny-inspector"  # saved beside the tiny backbone


def tiny_raw(tmp: Path, backbone_path: Path) -> dict:
    """A params mapping that runs the whole factory in seconds (the inspector sits beside the backbone)."""
    return {
        "world": {"image_size": 32, "classes": ["circle", "square"], "colours": ["red", "blue"], "max_objects": 2},
        "real": {"dir": str(tmp / "data/real"), "num_train": 4, "num_test": 4},
        "backbone": {"kind": "stable-diffusion", "model": str(backbone_path), "steps": 3, "guidance_scale": 2.0},
        "decoder": {"out": str(tmp / "models/decoder"), "channels": 16, "steps": 6, "batch_size": 4},
        "prompts": {"out": str(tmp / "data/prompts.json"), "num_prompts": 6},
        "generate": {"out": str(tmp / "data/generated"), "num_samples": 6, "batch_size": 4, "shard_size": 4},
        "filter": {"out": str(tmp / "data/filtered.json"), "min_score": 0.0},
        "export": {"out": str(tmp / "data/export"), "grid_samples": 4},
        "curate": {"out": str(tmp / "data/curated")},
        "downstream": {
            "out": str(tmp / "metrics/downstream.json"),
            "plot": str(tmp / "metrics/downstream_plot.json"),
            "baseline": str(tmp / "metrics/baseline.json"),
            "steps": 4,
            "batch_size": 4,
            "width": 8,
            # the baseline stage lists these keys one by one, so DVC needs them written out
            "lr": 0.003,
            "seed": 0,
            "colour_jitter": True,
            "seeds": 1,
            "synthetic_arm": False,
            "uplift_out": str(tmp / "metrics/uplift.json"),
            "uplift_parts": str(tmp / "metrics/uplift"),
            "uplift_seeds": 2,
            "uplift_steps": {"semantic": 3, "depth": 2, "keypoints": 2},
            "ceiling_images": 8,
            "ceiling_seed": 2000000,
        },
        # DVC needs every params key a stage lists (real-data lists these two) in params.yaml itself.
        "evaluate": {
            "out": str(tmp / "metrics/decoder.json"),
            "num_zero_shot": 4,
            "unseen_classes": ["hexagon"],
            "zero_shot_seed": 800000,
            "num_regenerated": 4,
            "regenerated_seed": 700000,
            "regenerate_strength": 0.6,
        },
        "inspect": {
            "out": str(tmp / "metrics/backbone.json"),
            "grid": str(tmp / "reports/fidelity_grid.png"),
            "model": str(backbone_path.parent / TINY_INSPECTOR),
            "num_fidelity": 2,
            "num_frechet": 4,
            "num_test": 8,
            "num_codec": 4,
        },
        "steer": {
            "out": str(tmp / "data/rounds"),
            "metrics": str(tmp / "metrics/rounds.json"),
            "plot": str(tmp / "metrics/rounds_plot.json"),
            "round": 0,
            "mode": "steered",
            "budget": 4,
            "floor": 0.3,
            "seed": 1,
            # the rounds stage lists these one by one (the config's defaults, written out for DVC)
            "candidates": 1,
            "shape_check": False,
            "validation": "synthetic",
            "folds": 4,
            "experiment_out": str(tmp / "data/steering"),
            "experiment_metrics": str(tmp / "metrics/steering.json"),
            "experiment_plot": str(tmp / "metrics/steering_plot.json"),
            "experiment_rounds": 2,
            "experiment_seeds": 1,
        },
        "report": {"out": str(tmp / "reports/report.md")},
    }


def build_tiny_inspector() -> Inspector:
    """An untrained inspector of the real architecture (its readings are arbitrary, its plumbing real)."""
    torch.manual_seed(0)
    return Inspector(SmallUNet(1 + len(SHAPES), width=8).eval(), SHAPES, ("red", "blue"), min_area=4)


def build_tiny_backbone(folder: Path, image_size: int = 32) -> Path:
    """A tiny random-weight Stable Diffusion pipeline folder (the embedded model's architecture in miniature)."""
    return build_tiny_sd(folder, image_size=image_size)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny-sd")
    build_tiny_inspector().save(path.parent / TINY_INSPECTOR)
    return path


@pytest.fixture
def tiny_backbone(tiny_backbone_dir: Path) -> StableDiffusionBackbone:
    return StableDiffusionBackbone.load(str(tiny_backbone_dir))


@pytest.fixture
def tiny_params(tmp_path: Path, tiny_backbone_dir: Path) -> Params:
    return params_from_dict(tiny_raw(tmp_path, tiny_backbone_dir), source=str(tmp_path / "params.yaml"))


@pytest.fixture
def tiny_params_file(tmp_path: Path, tiny_backbone_dir: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp_path, tiny_backbone_dir)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    """A workspace after every stage up to export ran (tiny params; one per test module that asks)."""
    from datasetdm import stages

    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_backbone_dir, root / "sd")
    params = params_from_dict(tiny_raw(root, root / "sd"), source=str(root / "params.yaml"))
    for stage in ("real-data", "train-decoder", "expand-prompts", "generate", "filter", "export"):
        stages.STAGES[stage](params)
    return root
