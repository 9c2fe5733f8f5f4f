from pathlib import Path

import pytest

from datasetdm.config import Params, load_params, params_from_dict
from datasetdm.errors import DatasetDMError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_parse_and_match_defaults_where_documented():
    p = load_params(REPO / "params.yaml")
    assert p.world.image_size == 64
    assert p.real.num_train == 20
    assert p.backbone.kind == "stable-diffusion" and p.backbone.model == "datasetdm/assets/mini-sd"
    assert Path(REPO / p.backbone.model / "model_index.json").is_file(), "the shipped miniature SD must exist"
    assert Path(REPO / p.inspect.model / "inspector.json").is_file(), "the shipped inspector must exist"


def test_empty_mapping_gives_defaults():
    assert params_from_dict({}) == Params()


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"wrld": {}}, "wrld", "unknown key"),
        ({"world": {"image_sise": 64}}, "world.image_sise", "unknown key"),
        ({"world": {"image_size": "64"}}, "world.image_size", "integer"),
        ({"world": {"image_size": 60}}, "world.image_size", "multiple of 16"),
        ({"world": {"classes": ["circle", "blob"]}}, "world.classes[1]", "unknown class 'blob'"),
        ({"world": {"classes": "circle"}}, "world.classes", "must be a list"),
        ({"generate": {"num_samples": -5}}, "generate.num_samples", "> 0"),
        ({"generate": {"num_samples": True}}, "generate.num_samples", "integer"),
        ({"filter": {"min_score": 2}}, "filter.min_score", "[0, 1]"),
        ({"backbone": {"kind": "dalle"}}, "backbone.kind", "unknown backbone 'dalle' (known: stable-diffusion)"),
        ({"decoder": {"heads": ["semantic", "pose"]}}, "decoder.heads", "semantic"),
        ({"decoder": {"heads": ["depth"]}}, "decoder.heads", "semantic"),
        ({"decoder": {"image_skip": "yes"}}, "decoder.image_skip", "true or false"),
        ({"prompts": {"templates": ["a photo"]}}, "prompts.templates[0]", "{objects}"),
        ({"world": []}, "world", "mapping"),
        ({"downstream": {"uplift_steps": {"semantic": 0}}}, "downstream.uplift_steps.semantic", "> 0"),
        ({"downstream": {"uplift_steps": {"pose": 300}}}, "downstream.uplift_steps.pose", "unknown key"),
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(DatasetDMError) as err:
        params_from_dict(raw, source="p.yaml")
    msg = str(err.value)
    assert msg.startswith(f"p.yaml: {key}: "), msg
    assert words in msg
    assert "\n" not in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("world:\n  image_size: [64\n")
    with pytest.raises(DatasetDMError, match=r"params.yaml: line \d+: not valid YAML"):
        load_params(f)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetDMError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
