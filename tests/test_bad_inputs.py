"""Malformed input, through the command line a user runs: one line, named, nothing touched.

Each case breaks one input a user controls (params, a labelled set, a checkpoint, the
prompts) in a copy of a finished tiny factory run, then runs one stage with
``python -m datasetdm <stage> --params``. The stage must exit non-zero with exactly
one stderr line, ``error: <file>: <field>: ...``, and leave every file in the
workspace -- earlier outputs included -- byte-for-byte as it was.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from datasetdm.config import Params, params_from_dict
from datasetdm.errors import DatasetDMError
from tests.conftest import REPO, tiny_raw


@pytest.fixture
def workspace(finished: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(finished, root)
    return root


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """break_(root, raw) edits files under root and/or the params mapping ``raw``.

    file: the path (relative to root) the error must name; field: text the error must
    name after it, or None where the whole file is the problem (not found, not UTF-8,
    not safetensors); says: more text the message must hold.
    """

    id: str
    stage: str
    break_: Callable[[Path, dict], Any]
    file: str
    field: str | None
    says: str = ""


def params_edit(edit: Callable[[dict], Any]) -> Callable[[Path, dict], None]:
    return lambda root, raw: edit(raw)


def set_key(dotted: str, value: Any) -> Callable[[Path, dict], None]:
    def edit(root: Path, raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


def write_params_text(text: str | bytes) -> Callable[[Path, dict], str]:
    def edit(root: Path, raw: dict) -> str:
        data = text.encode() if isinstance(text, str) else text
        (root / "params.yaml").write_bytes(data)
        return "params written"

    return edit


def edit_json(rel: str, edit: Callable[[Any], Any]) -> Callable[[Path, dict], None]:
    def apply(root: Path, raw: dict) -> None:
        path = root / rel
        data = json.loads(path.read_text())
        new = edit(data)
        path.write_text(json.dumps(data if new is None else new))

    return apply


def write_bytes(rel: str, data: Callable[[bytes], bytes]) -> Callable[[Path, dict], None]:
    def apply(root: Path, raw: dict) -> None:
        path = root / rel
        path.write_bytes(data(path.read_bytes()))

    return apply


def pickled_state(rel: str) -> Callable[[Path, dict], None]:
    """Replace a safetensors file by a torch pickle of plausible weights (what torch.save writes)."""

    def apply(root: Path, raw: dict) -> None:
        buf = io.BytesIO()
        torch.save({"weight": torch.zeros(3)}, buf)
        (root / rel).write_bytes(buf.getvalue())

    return apply


def remove(rel: str) -> Callable[[Path, dict], None]:
    return lambda root, raw: (root / rel).unlink()


def eight_bit_depth(root: Path, raw: dict) -> None:
    path = root / "data/real/train/depth/000000.png"
    with Image.open(path) as im:
        size = im.size
    Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(path)


SET = "data/real/train/annotations.json"
PROMPTS = "data/prompts.json"
UNET, TEXT = "sd/unet/diffusion_pytorch_model.safetensors", "sd/text_encoder/model.safetensors"
UNET_CONFIG, MODEL_INDEX = "sd/unet/config.json", "sd/model_index.json"
DEC, DEC_CONFIG = "models/decoder/decoder.safetensors", "models/decoder/config.json"


def _first_ann(coco: dict) -> dict:
    return coco["annotations"][0]


def _shrink_first_bbox(coco: dict) -> None:
    """Pull annotation 0's right edge 3 px in: inside the image, 1 px past the tolerance of its mask."""
    x, y, w, h = _first_ann(coco)["bbox"]
    assert w > 3
    _first_ann(coco)["bbox"] = [x, y, w - 3, h]


def _set_prompt(i: int, text: Any) -> Callable[[Any], None]:
    def edit(data: dict) -> None:
        data["prompts"][i]["prompt"] = text

    return edit


CASES = [
    # -- params.yaml: every stage reads it first
    Case("params-unknown-section", "expand-prompts", set_key("genrate", {"num_samples": 3}), "params.yaml", "genrate"),
    Case("params-unknown-key", "generate", set_key("generate.num_sample", 3), "params.yaml", "generate.num_sample"),
    Case(
        "params-string-for-int",
        "generate",
        set_key("generate.num_samples", "ten"),
        "params.yaml",
        "generate.num_samples",
    ),
    Case(
        "params-list-for-float",
        "generate",
        set_key("backbone.guidance_scale", [1.0]),
        "params.yaml",
        "backbone.guidance_scale",
    ),
    Case("params-bool-for-int", "train-decoder", set_key("decoder.steps", True), "params.yaml", "decoder.steps"),
    Case(
        "params-negative-count", "generate", set_key("generate.num_samples", -3), "params.yaml", "generate.num_samples"
    ),
    Case("params-zero-batch", "generate", set_key("generate.batch_size", 0), "params.yaml", "generate.batch_size"),
    Case("params-negative-k", "real-data", set_key("real.num_train", -1), "params.yaml", "real.num_train"),
    Case(
        "params-unknown-class",
        "real-data",
        set_key("world.classes", ["circle", "dodecahedron"]),
        "params.yaml",
        "world.classes[1]",
    ),
    Case("params-no-classes", "real-data", set_key("world.classes", []), "params.yaml", "world.classes"),
    Case(
        "params-repeated-class",
        "real-data",
        set_key("world.classes", ["circle", "circle"]),
        "params.yaml",
        "world.classes",
    ),
    Case("params-section-not-mapping", "generate", set_key("generate", 5), "params.yaml", "generate"),
    Case("params-top-level-list", "generate", write_params_text("- 1\n- 2\n"), "params.yaml", "(top level)"),
    Case(
        "params-yaml-syntax", "generate", write_params_text("world: {image_size: 64\nreal: ["), "params.yaml", "line"
    ),
    Case("params-not-utf8", "generate", write_params_text(b"world: \xff\xfe\n"), "params.yaml", None),
    Case("params-score-above-one", "filter", set_key("filter.min_score", 1.5), "params.yaml", "filter.min_score"),
    Case(
        "params-infinite-guidance",
        "generate",
        set_key("backbone.guidance_scale", float("inf")),
        "params.yaml",
        "backbone.guidance_scale",
    ),
    Case("params-nan-lr", "train-decoder", set_key("decoder.lr", float("nan")), "params.yaml", "decoder.lr"),
    Case("params-empty-path", "generate", set_key("generate.out", ""), "params.yaml", "generate.out"),
    Case("params-unknown-backbone", "generate", set_key("backbone.kind", "sdxl"), "params.yaml", "backbone.kind"),
    Case("params-odd-image-size", "real-data", set_key("world.image_size", 30), "params.yaml", "world.image_size"),
    Case(
        "params-template-without-objects",
        "expand-prompts",
        set_key("prompts.templates", ["a photo"]),
        "params.yaml",
        "prompts.templates[0]",
    ),
    Case(
        "params-prompt-objects-over-world",
        "expand-prompts",
        set_key("prompts.max_objects", 3),
        "params.yaml",
        "prompts.max_objects",
    ),
    # a class the trained decoder labels is missing from world.classes
    Case("params-class-missing-for-decoder", "generate", set_key("world.classes", ["circle"]), DEC_CONFIG, "classes"),
    # -- the labelled few-shot set (train-decoder must keep the decoder it had)
    Case(
        "set-corrupt-image",
        "train-decoder",
        write_bytes("data/real/train/images/000000.png", lambda b: b[:60]),
        SET,
        "images[0].file_name",
    ),
    Case(
        "set-image-missing", "train-decoder", remove("data/real/train/images/000001.png"), SET, "images[1].file_name"
    ),
    Case("set-json-is-a-list", "train-decoder", edit_json(SET, lambda coco: [1, 2, 3]), SET, "(top level)"),
    Case(
        "set-json-without-annotations",
        "train-decoder",
        edit_json(SET, lambda coco: coco.pop("annotations")),
        SET,
        "annotations",
    ),
    Case("set-json-truncated", "train-decoder", write_bytes(SET, lambda b: b[:200]), SET, "line"),
    Case(
        "set-mask-size-differs",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c)["segmentation"].update(size=[16, 16])),
        SET,
        "annotations[0].segmentation",
    ),
    Case(
        "set-unknown-category-id",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c).update(category_id=99)),
        SET,
        "annotations[0].category_id",
    ),
    Case(
        "set-unknown-category-name",
        "train-decoder",
        edit_json(SET, lambda c: c["categories"][0].update(name="dragon")),
        SET,
        "categories[0].name",
    ),
    Case("set-empty", "train-decoder", edit_json(SET, lambda c: c.update(images=[], annotations=[])), SET, "images"),
    Case(
        "set-width-differs",
        "train-decoder",
        edit_json(SET, lambda c: c["images"][0].update(width=99)),
        SET,
        "images[0].width",
    ),
    Case(
        "set-rle-garbage",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c)["segmentation"].update(counts="\u00e9\u00e9")),
        SET,
        "annotations[0].segmentation",
    ),
    Case("set-8-bit-depth", "train-decoder", eight_bit_depth, SET, "images[0].depth_file"),
    # -- the labelled set agrees with itself: ids, files, boxes, areas, keypoints
    Case(
        "set-duplicate-image-id",
        "train-decoder",
        edit_json(SET, lambda c: c["images"][1].update(id=c["images"][0]["id"])),
        SET,
        "images[1].id",
        "duplicate image id",
    ),
    Case(
        "set-duplicate-file-name",
        "train-decoder",
        edit_json(SET, lambda c: c["images"][1].update(file_name=c["images"][0]["file_name"])),
        SET,
        "images[1].file_name",
        "also the file of images[0]",
    ),
    Case(
        "set-duplicate-annotation-id",
        "train-decoder",
        edit_json(SET, lambda c: c["annotations"][1].update(id=_first_ann(c)["id"])),
        SET,
        "annotations[1].id",
        "duplicate annotation id",
    ),
    Case(
        "set-bbox-past-image",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c).update(bbox=[30, 0, 10, 10])),
        SET,
        "annotations[0] (id 1).bbox",
        "[30, 0, 10, 10] extends past the image (32x32, WxH)",
    ),
    Case(
        "set-bbox-off-mask",
        "train-decoder",
        edit_json(SET, _shrink_first_bbox),
        SET,
        "annotations[0] (id 1).bbox",
        "differs from the segmentation's own box",
    ),
    Case(
        "set-area-off-mask",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c).update(area=_first_ann(c)["area"] * 1.2 + 3)),
        SET,
        "annotations[0] (id 1).area",
        "by more than 5% or 2 px",
    ),
    Case(
        "set-keypoint-count",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c).update(keypoints=[1.0, 2.0, 2] * 9)),
        SET,
        "annotations[0] (id 1).keypoints",
        "declares",
    ),
    Case(
        "set-num-keypoints",
        "train-decoder",
        edit_json(SET, lambda c: _first_ann(c).update(num_keypoints=_first_ann(c)["num_keypoints"] + 1)),
        SET,
        "annotations[0] (id 1).num_keypoints",
        "keypoints label",
    ),
    # -- the backbone's pipeline folder (train-decoder must keep the decoder it had)
    Case(
        "backbone-truncated",
        "train-decoder",
        write_bytes(UNET, lambda b: b[: len(b) // 2]),
        "sd/unet",
        "backbone.model",
        "cannot load unet",
    ),
    Case(
        "backbone-pickle",
        "train-decoder",
        pickled_state(TEXT),
        "sd/text_encoder",
        "backbone.model",
        "cannot load text_encoder",
    ),
    Case(
        "backbone-wrong-architecture",
        "train-decoder",
        edit_json(UNET_CONFIG, lambda c: c.update(block_out_channels=[16, 16, 16])),
        "sd/unet",
        "backbone.model",
        "wrong architecture",
    ),
    Case(
        "backbone-index-not-json",
        "train-decoder",
        write_bytes(MODEL_INDEX, lambda b: b"{not json"),
        MODEL_INDEX,
        "backbone.model",
        "not valid JSON",
    ),
    # -- the trained decoder's checkpoint (generate must keep the generated set it had)
    Case(
        "decoder-truncated",
        "generate",
        write_bytes(DEC, lambda b: b[: len(b) // 2]),
        DEC,
        None,
        "not a readable safetensors file",
    ),
    Case("decoder-pickle", "generate", pickled_state(DEC), DEC, None, "pickle"),
    Case(
        "decoder-wrong-architecture",
        "generate",
        edit_json(DEC_CONFIG, lambda c: c.update(channels=32)),
        DEC,
        "lateral.0.weight",
        "wrong architecture",
    ),
    Case(
        "decoder-config-not-json",
        "generate",
        write_bytes(DEC_CONFIG, lambda b: b"[1, 2"),
        DEC_CONFIG,
        None,
        "not a decoder config",
    ),
    # -- the prompts (generate must keep the generated set it had)
    Case("prompt-empty", "generate", edit_json(PROMPTS, _set_prompt(0, "")), PROMPTS, "prompts[0]"),
    Case(
        "prompt-cannot-encode",
        "generate",
        edit_json(PROMPTS, _set_prompt(1, "a red circle $$")),
        PROMPTS,
        "prompts[1]",
        "cannot encode",
    ),
    Case(
        "prompt-path-traversal",
        "generate",
        edit_json(PROMPTS, _set_prompt(2, "a red circle ../../etc/passwd")),
        PROMPTS,
        "prompts[2]",
    ),
    Case("prompt-names-no-class", "generate", edit_json(PROMPTS, _set_prompt(0, "a red star")), PROMPTS, "prompts[0]"),
    Case(
        "prompt-too-long",
        "generate",
        edit_json(PROMPTS, _set_prompt(0, " ".join(["red circle"] * 40))),
        PROMPTS,
        "prompts[0]",
    ),
    Case("prompts-none", "generate", edit_json(PROMPTS, lambda d: d.update(prompts=[])), PROMPTS, "prompts"),
    Case(
        "prompts-plain-strings",
        "generate",
        edit_json(PROMPTS, lambda d: d.update(prompts=["a red circle"])),
        PROMPTS,
        "prompts",
    ),
    Case("prompts-not-json", "generate", write_bytes(PROMPTS, lambda b: b'{"prompts": ['), PROMPTS, "line"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# One case per kind of input runs in the fast suite; the whole matrix (about 50 CLI runs,
# several minutes on 2 busy cores) is marked slow and runs in CI.
FAST = {"params-unknown-key", "set-mask-size-differs", "decoder-pickle", "prompt-path-traversal"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=() if c.id in FAST else pytest.mark.slow) for c in CASES]
)
def test_bad_input_is_one_named_line_and_touches_nothing(case: Case, workspace: Path) -> None:
    raw = tiny_raw(workspace, workspace / "sd")
    params_file = workspace / "params.yaml"
    if case.break_(workspace, raw) != "params written":
        params_file.write_text(yaml.safe_dump(raw))
    before = snapshot(workspace)

    proc = subprocess.run(
        [sys.executable, "-m", "datasetdm", case.stage, "--params", str(params_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # a progress bar or a traceback before the error fails here
    assert len(lines) == 1, f"exit {proc.returncode}; stderr: {proc.stderr!r}; stdout: {proc.stdout!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    file_part = str(workspace / case.file)
    assert line.startswith(f"error: {file_part}"), line
    if case.field is not None:
        assert line.startswith(f"error: {file_part}: ") and case.field in line[len(f"error: {file_part}: ") :], line
    assert case.says in line, line
    assert snapshot(workspace) == before  # earlier outputs (and the broken input itself) untouched


def test_the_matrix_is_big_enough() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.stage for c in CASES} >= {"real-data", "train-decoder", "expand-prompts", "generate", "filter"}


# ----------------------------------------------------------------------------- property


VALID = tiny_raw(Path("/tmp/datasetdm-property"), Path("/tmp/datasetdm-property/sd"))

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 70), st.text(max_size=6), st.floats()), max_size=3),
)
_value = st.one_of(_leaf, st.dictionaries(st.text(max_size=6), _leaf, max_size=3))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    return out


@st.composite
def mutated_params(draw: st.DrawFn) -> Any:
    """The valid tiny mapping with 1-4 random edits: replace, delete or add a key anywhere."""
    raw: Any = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(raw)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                raw = draw(_value)
            continue
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        if not isinstance(parent, dict):
            continue
        if action == "replace":
            parent[path[-1]] = draw(_value)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.one_of(st.text(max_size=6), st.integers()))] = draw(_value)
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_params())
def test_any_mutated_params_parse_or_raise_datasetdm_error(raw: Any) -> None:
    try:
        params = params_from_dict(raw, source="params.yaml")
    except DatasetDMError as e:
        message = str(e)
        assert message.startswith("params.yaml: ") and len(message.splitlines()) == 1, message
    else:
        assert isinstance(params, Params)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_parses_or_raises_datasetdm_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("yaml") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    from datasetdm.config import load_params

    try:
        assert isinstance(load_params(path), Params)
    except DatasetDMError as e:
        assert str(e).startswith(f"{path}: ") and len(str(e).splitlines()) == 1, str(e)
