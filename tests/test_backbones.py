"""The backbone registry: ``backbone.kind`` names a loader; an unknown kind is one line listing the known ones."""

from __future__ import annotations

import pytest
import yaml

from datasetdm import backbones
from datasetdm.cli import main
from datasetdm.config import load_params, params_from_dict
from datasetdm.errors import DatasetDMError


def test_unknown_kind_is_one_line_listing_the_known_kinds(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"backbone": {"kind": "foo"}}))
    with pytest.raises(DatasetDMError) as err:
        load_params(params_file)
    assert str(err.value) == f"{params_file}: backbone.kind: unknown backbone 'foo' (known: stable-diffusion)"


def test_unknown_kind_on_the_command_line(tmp_path, capsys):
    """What ``dvc repro`` shows: exit 2 and one line on stderr, before any model is read."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"backbone": {"kind": "foo"}}))
    assert main(["generate", "--params", str(params_file)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: {params_file}: backbone.kind: unknown backbone 'foo' (known: stable-diffusion)"]


def test_a_registered_loader_is_listed_and_loads_with_the_output_device(monkeypatch):
    from datasetdm import stages

    monkeypatch.setattr(backbones, "_LOADERS", dict(backbones._LOADERS))  # registrations end with the test
    calls = []

    def fake(cfg, *, source, output_device):
        calls.append((cfg.model, source, output_device))
        return "a backbone"

    backbones.register_backbone("fake", fake)
    assert backbones.known_backbones() == ("stable-diffusion", "fake")
    with pytest.raises(DatasetDMError, match=r"unknown backbone 'foo' \(known: stable-diffusion, fake\)"):
        params_from_dict({"backbone": {"kind": "foo"}}, source="p.yaml")
    params = params_from_dict({"backbone": {"kind": "fake", "model": "somewhere", "device": "cpu"}}, source="p.yaml")
    # The stages hand results back where the decoder runs: backbone.device.
    assert stages.load_backbone(params) == "a backbone"
    assert calls == [("somewhere", "p.yaml", "cpu")]
