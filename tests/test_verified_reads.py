"""Verified reads, through the command line a user runs: a stage checks the hash the
writing stage recorded before using what it reads, and a mismatch is one line naming
the file and what to run, with every file on disk left as it was.

Covered here: filter decisions against the generation manifest (export), an export
against its card (downstream, report) and checkpoints against their config (the
decoder through generate, the inspector and the curated export in-process). Shards
against the manifest: tests/test_generate.py and tests/test_export.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from datasetdm import stages
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.sd_folder import PRETRAIN_LOG, folder_fingerprint
from datasetdm.config import params_from_dict
from datasetdm.decoder.model import PDecoder
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.inspector import Inspector
from datasetdm.export.verify import export_files, verify_curated, verify_export
from tests.conftest import REPO, build_tiny_inspector, tiny_raw


@pytest.fixture
def workspace(finished: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(finished, root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw(root, root / "sd")))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(root: Path, stage: str) -> str:
    """Run ``stage`` through the CLI; assert it refused with one line and touched nothing; return the line."""
    before = snapshot(root)
    proc = subprocess.run(
        [sys.executable, "-m", "datasetdm", stage, "--params", str(root / "params.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert snapshot(root) == before  # earlier outputs and the edited input itself, byte for byte
    return proc.stderr.strip()


def test_decisions_from_another_generation_run_stop_the_export(workspace: Path) -> None:
    raw = tiny_raw(workspace, workspace / "sd")
    raw["generate"]["seed"] = 1  # generate rerun with another seed: same sample ids, other pixels
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    params = params_from_dict(raw, source=str(workspace / "params.yaml"))
    stages.STAGES["generate"](params)

    line = refused(workspace, "export")
    assert line == (
        f"error: {workspace}/data/filtered.json: generation_manifest: these decisions were made for another "
        f"generation run than {workspace}/data/generated/manifest.json (its sha256 differs); run the filter stage"
    )
    stages.STAGES["filter"](params)  # what the line says to run
    assert stages.STAGES["export"](params)["generated"] == 6


@pytest.mark.parametrize("stage", ["downstream", "report"])
def test_an_edited_export_stops_its_readers(workspace: Path, stage: str) -> None:
    mask = sorted((workspace / "data/export/masks").iterdir())[0]
    mask.write_bytes(mask.read_bytes() + b"\0")

    line = refused(workspace, stage)
    assert line == (
        f"error: {workspace}/data/export/masks: files.masks: changed since it was written "
        "(sha256 differs from dataset.json); run the export stage"
    )


def test_edited_decoder_weights_stop_generation(workspace: Path) -> None:
    weights = workspace / "models/decoder/decoder.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3  # still loads, still fits: only the hash tells
    save_file(state, weights)

    line = refused(workspace, "generate")
    assert line == (
        f"error: {weights}: sha256: does not match the weights_sha256 config.json recorded at training "
        "(the weights changed since); run the train-decoder stage"
    )


def test_an_edited_pretrained_backbone_stops_generation(workspace: Path) -> None:
    """A folder pretraining sealed (as the embedded model is) must hash as sealed to be used."""
    sd = workspace / "sd"
    (sd / PRETRAIN_LOG).write_text(json.dumps({"log": [], "fingerprint": folder_fingerprint(sd)}))
    StableDiffusionBackbone.load(str(sd))  # sealed and intact: loads
    weights = sd / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    save_file(state, weights)

    line = refused(workspace, "generate")
    assert line == (
        f"error: {sd}: {PRETRAIN_LOG}: fingerprint: its weights, configs or tokenizer changed since pretraining "
        "wrote it; restore the folder (git checkout, for the embedded model) or run make pretrain"
    )


def test_the_embedded_backbone_is_sealed() -> None:
    from datasetdm.backbones.sd_folder import check_seal

    asset = REPO / "datasetdm/assets/mini-sd"
    assert json.loads((asset / PRETRAIN_LOG).read_text())["fingerprint"] == folder_fingerprint(asset)
    check_seal(asset)


def test_a_decoder_without_its_seal_is_refused(workspace: Path) -> None:
    config_file = workspace / "models/decoder/config.json"
    config = json.loads(config_file.read_text())
    assert len(config.pop("weights_sha256")) == 64
    config_file.write_text(json.dumps(config))
    with pytest.raises(DatasetDMError, match=r"config\.json: weights_sha256: missing, .*run the train-decoder stage$"):
        PDecoder.load(workspace / "models/decoder")


def test_edited_inspector_weights_are_refused(tmp_path: Path) -> None:
    build_tiny_inspector().save(tmp_path / "insp")
    Inspector.load(tmp_path / "insp")
    weights = tmp_path / "insp" / "inspector.safetensors"
    state = load_file(weights)
    state = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, weights)
    with pytest.raises(DatasetDMError) as e:
        Inspector.load(tmp_path / "insp")
    assert str(e.value) == (
        f"{weights}: sha256: does not match the weights_sha256 inspector.json recorded at training "
        "(the weights changed since); run `make inspector`"
    )


def test_the_shipped_inspector_is_sealed() -> None:
    meta = json.loads((REPO / "datasetdm/assets/inspector/inspector.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    assert isinstance(Inspector.load(REPO / "datasetdm/assets/inspector"), Inspector)


def _tiny_export(root: Path, record: str) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "a.png").write_bytes(b"image")
    (root / "masks" / "a.png").write_bytes(b"mask")
    (root / "annotations.json").write_text("{}")
    (root / record).write_text(json.dumps({"files": export_files(root, record_file=record)}))


@pytest.mark.parametrize(
    ("edit", "named", "says"),
    [
        (lambda r: (r / "images" / "a.png").write_bytes(b"other"), "images: files.images", "changed since"),
        (lambda r: (r / "annotations.json").unlink(), "annotations.json: files.annotations.json", "missing"),
        (lambda r: (r / "depth").mkdir(), "depth: files.depth", "present but not recorded"),
    ],
)
def test_verify_curated_and_export_name_the_file(tmp_path: Path, edit, named: str, says: str) -> None:
    for record, verify, stage in (
        ("curation.json", verify_curated, "curate"),
        ("dataset.json", verify_export, "export"),
    ):
        root = tmp_path / stage
        _tiny_export(root, record)
        assert verify(root)["files"] == export_files(root, record_file=record)
        edit(root)
        with pytest.raises(DatasetDMError) as e:
            verify(root)
        assert str(e.value).startswith(f"{root}/{named}: ") and says in str(e.value), str(e.value)
        assert str(e.value).endswith(f"run the {stage} stage")
