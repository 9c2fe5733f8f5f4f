"""Reliability of generation and export: crash-safe resume, determinism, safe names.

Everything here runs the real tiny backbone and a really trained tiny P-Decoder
(``tests/conftest.py``). The SIGKILL test drives ``python -m datasetdm generate`` as a
subprocess, exactly as ``dvc repro`` does.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from datasetdm import stages
from datasetdm.config import BackboneConfig, Params, params_from_dict
from datasetdm.errors import DatasetDMError
from datasetdm.generate import MANIFEST, annotate_batch
from datasetdm.io import sha256_dir
from tests.conftest import REPO, tiny_raw

NUM_SAMPLES, SHARD_SIZE = 24, 4  # six shards, so there are kill points between and inside shards


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> tuple[Path, dict]:
    """A workspace with labelled sets, a trained tiny decoder and prompts; the raw params."""
    root = tmp_path_factory.mktemp("reliability")
    raw = tiny_raw(root, tiny_backbone_dir)
    raw["generate"].update(num_samples=NUM_SAMPLES, shard_size=SHARD_SIZE, batch_size=2)
    params = params_from_dict(raw, source=str(root / "params.yaml"))
    stages.make_real_sets(params)
    stages.train_decoder_stage(params)
    stages.expand_prompts_stage(params)
    return root, raw


def variant(root: Path, raw: dict, name: str, **generate: object) -> tuple[Path, Params]:
    """A params file (and its parsed Params) that writes generation to ``root/name``."""
    raw = json.loads(json.dumps(raw))
    raw["generate"].update(out=str(root / name / "generated"), **generate)
    raw["filter"]["out"] = str(root / name / "filtered.json")
    raw["export"]["out"] = str(root / name / "export")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, params_from_dict(raw, source=str(path))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_tells_the_truth(gen_dir: Path) -> bool:
    """No manifest, or one that lists exactly the shards on disk with their true hashes."""
    if not (gen_dir / MANIFEST).exists():
        return True
    manifest = json.loads((gen_dir / MANIFEST).read_text())
    listed = {s["name"]: s["sha256"] for s in manifest["shards"]}
    return listed == {p.name: sha256_dir(p) for p in gen_dir.glob("shard-*")}


def generate_cli(params_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "datasetdm", "generate", "--params", str(params_file)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def temporaries(gen_dir: Path) -> set[Path]:
    return set(gen_dir.glob(".shard-*.tmp"))


def progress(gen_dir: Path, ignore: set[Path], since: float) -> tuple[int, int]:
    """(shards finished after ``since``, images in this run's shard temporary) -- what a kill interrupts.

    ``ignore``: temporaries an earlier killed run left (the new run deletes them).
    The run renames and deletes folders while this reads them, so a read that loses a
    folder under it is simply taken again (CI once lost a shard temporary mid-glob).
    """
    while True:
        try:
            if not gen_dir.is_dir():
                return 0, 0
            done = sum(1 for p in gen_dir.glob("shard-*") if p.is_dir() and p.stat().st_mtime >= since)
            temps = temporaries(gen_dir) - ignore
            partial = sum(1 for t in temps for _ in t.glob("shard-*/images/*.png"))
            return done, partial
        except FileNotFoundError:
            continue


# ------------------------------------------------------------------------- crash safety


@pytest.mark.slow
def test_sigkilled_generation_resumes_to_the_same_bytes(trained):
    """SIGKILL ``generate`` at >= 5 seeded points (mid-shard and between shards), resume,
    and get byte-for-byte the dataset of a run that was never killed."""
    root, raw = trained
    ref_file, ref = variant(root, raw, "never-killed")
    proc = generate_cli(ref_file)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    # The folder first holds a finished run of other settings: its manifest must go as
    # soon as a shard is replaced, or a killed run would leave it vouching for new shards.
    stages.generate_stage(variant(root, raw, "killed", num_samples=SHARD_SIZE, seed=1)[1])
    killed_file, killed = variant(root, raw, "killed")
    gen_dir = Path(killed.generate.out)
    assert (gen_dir / MANIFEST).is_file()
    rng = random.Random(6)
    # Kill points are sample positions: kill once `position` samples are finished or in
    # a shard temporary. Increasing positions guarantee every run gets further, and a
    # resumed run restarts its unfinished shard, so a position can land anywhere.
    # Positions stop one shard short of the end so that the run is still busy when the
    # (randomly delayed) kill arrives.
    positions = sorted(rng.sample(range(1, NUM_SAMPLES - SHARD_SIZE), 5))
    kills = []
    time.sleep(0.05)
    since = time.time()  # shards finished after this are the killed runs' work
    for position in positions:
        stale = temporaries(gen_dir) if gen_dir.is_dir() else set()
        proc = generate_cli(killed_file)
        while proc.poll() is None:
            done, partial = progress(gen_dir, stale, since)
            if done * SHARD_SIZE + partial >= position:
                time.sleep(rng.uniform(0, 0.2))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        returncode = proc.wait(timeout=600)
        assert returncode == -signal.SIGKILL, f"finished before the kill at sample {position}: {proc.stderr.read()}"
        kills.append((position, *progress(gen_dir, stale, since)))
        # A killed run must never leave a manifest vouching for shards that are not there.
        assert manifest_tells_the_truth(gen_dir), kills
    assert len(kills) >= 5
    # (position, finished shards, images in the interrupted shard) per kill
    assert any(partial for _, _, partial in kills), f"no kill landed inside a shard: {kills}"

    proc = generate_cli(killed_file)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    want, got = snapshot(Path(ref.generate.out)), snapshot(gen_dir)
    assert sorted(got) == sorted(want)  # nothing missing, no duplicate, no leftover temporaries
    assert got == want
    records = [r for k in range(NUM_SAMPLES // SHARD_SIZE) for r in json.loads(got[f"shard-{k:05d}/records.json"])]
    assert [r["id"] for r in records] == [f"{i:06d}" for i in range(NUM_SAMPLES)]
    for r in records:
        with Image.open(gen_dir / r["shard"] / r["image"]) as im:
            im.load()  # decodes: not truncated


def test_leftovers_of_a_killed_run_are_cleared_and_the_manifest_is_the_seal(trained):
    """A stale temporary is removed on resume; a run stopped before its manifest leaves none."""
    root, raw = trained
    _, params = variant(root, raw, "leftovers", num_samples=8)
    gen_dir = Path(params.generate.out)
    stages.generate_stage(params)
    first = snapshot(gen_dir)
    # What SIGKILL leaves mid-shard and mid-manifest: atomic_path temporaries.
    (gen_dir / ".shard-00001.abc123.tmp/shard-00001/images").mkdir(parents=True)
    (gen_dir / ".shard-00001.abc123.tmp/shard-00001/images/000004.png").write_bytes(b"\x89PNG half")
    (gen_dir / ".manifest.json.xyz.tmp").mkdir()
    shutil.rmtree(gen_dir / "shard-00001")
    stages.generate_stage(params)
    assert snapshot(gen_dir) == first

    # A shard whose records are garbage is made again, not trusted and not a traceback.
    (gen_dir / "shard-00000/records.json").write_text('{"not": "a list"}')
    stages.generate_stage(params)
    assert snapshot(gen_dir) == first


# ------------------------------------------------------------------------- determinism


def exported(params: Params) -> dict[str, bytes]:
    stages.generate_stage(params)
    stages.filter_stage(params)
    stages.export_stage(params)
    return snapshot(Path(params.export.out))


def _depth_apart(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Depth PNGs (as arrays) apart from every other file; the manifest, which hashes them, is left out."""
    depth = {k: np.asarray(Image.open(io.BytesIO(v))).astype(np.int64) for k, v in files.items() if "depth/" in k}
    rest = {k: v for k, v in files.items() if "depth/" not in k and not k.endswith(MANIFEST)}
    return rest, depth


def test_same_params_give_identical_bytes_across_runs_and_batch_sizes(trained):
    """Same batch size: every byte identical. Other batch sizes: masks, COCO JSON and the card's samples
    identical, image pixels within 1 level and depth within 1 mm (CPU kernels pick other algorithms for
    other batch shapes, which moves depth and the filter's float scores in their last bits)."""
    root, raw = trained
    runs = {}
    for name, batch in (("b2-first", 2), ("b2-again", 2), ("b4", 4), ("b3", 3)):  # 3 splits a shard of 4 as 3 + 1
        _, params = variant(root, raw, name, num_samples=8, batch_size=batch)
        runs[name] = (exported(params), snapshot(Path(params.generate.out)))
    reference_export, reference_gen = runs.pop("b2-first")
    assert any(k.startswith("masks/") for k in reference_export) and "annotations.json" in reference_export
    # The card may differ only where it names this run's settings and paths: "params"
    # (batch size, output folders) and "provenance" (input paths and their hashes).
    reference_card = json.loads(reference_export.pop("dataset.json"))
    for key in ("params", "provenance"):
        reference_card.pop(key, None)
    for name, (export, gen) in runs.items():
        card = json.loads(export.pop("dataset.json"))
        for key in ("params", "provenance"):
            card.pop(key, None)
        if name == "b2-again":
            assert card == reference_card and export == reference_export and gen == reference_gen, name
            continue
        assert card["counts"] == reference_card["counts"] and card["samples"] == reference_card["samples"], name
        exact = [k for k in reference_export if k.startswith("masks/") or k == "annotations.json"]
        assert exact and all(export[k] == reference_export[k] for k in exact), (
            name,
            [k for k in exact if export[k] != reference_export[k]],
        )
        for k in (k for k in reference_export if k.startswith("images/")):
            a, b = (np.asarray(Image.open(io.BytesIO(f[k]))).astype(np.int64) for f in (export, reference_export))
            assert np.abs(a - b).max() <= 1, (name, k, int(np.abs(a - b).max()))
        depth, ref_depth = _depth_apart(export)[1], _depth_apart(reference_export)[1]
        assert depth.keys() == ref_depth.keys() and all(np.abs(depth[k] - ref_depth[k]).max() <= 1 for k in depth), (
            name
        )


def test_the_card_is_enough_to_reproduce_a_sample(trained):
    """From dataset.json alone (prompt, seed, scheduler, steps, guidance, feature timestep,
    model hashes) a sample is made again on its own (batch 1): its mask exact, its pixels
    within 1 level (the README's promise across batch sizes; CPU kernels differ by shape)."""
    root, raw = trained
    _, params = variant(root, raw, "card", num_samples=6)
    exported(params)
    out = Path(params.export.out)
    card = json.loads((out / "dataset.json").read_text())
    assert len(card["samples"]) == card["counts"]["generated"] == 6
    assert all(set(s) == {"id", "prompt", "seed", "kept"} for s in card["samples"])
    reproduce = card["reproduce"]
    assert reproduce["scheduler"] == "DDIMScheduler"

    backbone = stages.load_backbone(params)
    decoder = stages.load_decoder(params, backbone)
    assert card["models"] == {"backbone": backbone.fingerprint(), "decoder": decoder.fingerprint()}
    sample = [s for s in card["samples"] if s["kept"]][-1]
    bb = BackboneConfig(
        steps=reproduce["steps"],
        guidance_scale=reproduce["guidance_scale"],
        feature_timestep=reproduce["feature_timestep"],
    )
    made = annotate_batch(
        backbone, decoder, [sample["prompt"]], [sample["seed"]], classes=tuple(card["classes"]), bb=bb
    )
    pixels, labels = made.pixels, made.labels
    with Image.open(out / "images" / f"{sample['id']}.png") as im:
        assert np.abs(np.asarray(im, dtype=np.int16) - pixels[0].astype(np.int16)).max() <= 1
    with Image.open(out / "masks" / f"{sample['id']}.png") as im:
        np.testing.assert_array_equal(np.asarray(im), labels[0])
    # The same sample under other settings differs, so the check above could fail.
    other = annotate_batch(
        backbone, decoder, [sample["prompt"]], [sample["seed"] + 1], classes=tuple(card["classes"]), bb=bb
    ).pixels
    assert not np.array_equal(other[0], pixels[0])


# ------------------------------------------------------------------------- safety


def _rewrite_records(gen_dir: Path, edit) -> None:
    """Apply ``edit`` to the first record and re-seal the manifest with true hashes."""
    records_file = gen_dir / "shard-00000/records.json"
    records = json.loads(records_file.read_text())
    edit(records[0])
    records_file.write_text(json.dumps(records))
    manifest = json.loads((gen_dir / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = sha256_dir(gen_dir / "shard-00000")
    (gen_dir / MANIFEST).write_text(json.dumps(manifest))


def test_export_names_cannot_escape_the_output_folder(trained):
    """A prompt with "../" is only data; an id with "../" or a separator is refused, and
    nothing is written outside the export folder either way."""
    root, raw = trained
    _, params = variant(root, raw, "escape", num_samples=4)
    stages.generate_stage(params)
    gen_dir, out = Path(params.generate.out), Path(params.export.out)
    _rewrite_records(gen_dir, lambda r: r.update(prompt="../../../escape/a red circle"))
    stages.filter_stage(params)
    outside = {p for p in root.rglob("*") if out not in p.parents and p != out}
    card = stages.export_stage(params)
    assert card["kept"] == 4
    assert {p for p in root.rglob("*") if out not in p.parents and p != out} == outside
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["images"][0]["prompt"] == "../../../escape/a red circle"
    before = snapshot(out)

    for bad_id in ("../../escaped", "a/b", ".hidden", "x\x00y", "/abs"):
        _rewrite_records(gen_dir, lambda r: r.update(id=bad_id))
        stages.filter_stage(params)
        with pytest.raises(DatasetDMError, match=r"records\.json: \[0\]\.id: must be a plain file name"):
            stages.export_stage(params)
        assert snapshot(out) == before
        assert {p for p in root.rglob("*") if out not in p.parents and p != out} == outside


def test_no_checkpoint_is_loaded_with_pickle():
    """Weights load only through safetensors: no torch.load or pickle anywhere in the library."""
    offenders = []
    for path in (REPO / "datasetdm").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "import pickle", "pickle.load", "from pickle", "weights_only"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


def test_servers_bind_localhost_by_default():
    """Whatever the repo starts as a server listens on 127.0.0.1 unless told otherwise.

    Read from the sources rather than by starting each server (a Prefect server, the
    FiftyOne app and its database, a Dask cluster: minutes and ports on a shared CI box).
    """
    sources = {
        p: p.read_text(encoding="utf-8")
        for folder in ("scripts", "flows", "tasks", "datasetdm")
        for p in (REPO / folder).rglob("*")
        if p.suffix in (".py", ".sh")
    }
    sources.update(
        {REPO / name: (REPO / name).read_text() for name in ("Makefile", "prefect.yaml") if (REPO / name).is_file()}
    )
    assert not [str(p) for p, text in sources.items() if "0.0.0.0" in text]
    prefect = (REPO / "scripts/prefect_up.sh").read_text()
    assert all("--host 127.0.0.1" in line for line in prefect.splitlines() if "server start" in line)
    assert '"--address", "127.0.0.1"' in (REPO / "scripts/fiftyone_app.py").read_text()
    assert '"host": "127.0.0.1"' in (REPO / "flows/generate.py").read_text()
