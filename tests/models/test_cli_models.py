from __future__ import annotations

import json

from kdreid.cli import main


def test_models_command_prints_counts(capsys):
    assert main(["models", "osnet_x0_25", "resnet_tiny", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    # OSNet x0.25 as published (Zhou et al.): 0.2M parameters, 82.3M MACs at 256×128 (its 512-d fc included)
    assert 0.19e6 < rows["osnet_x0_25"]["params"] < 0.21e6
    assert 81e6 < rows["osnet_x0_25"]["macs"] < 84e6
    assert rows["osnet_x0_25"]["stage_channels"] == [64, 96, 128, 128]
    assert rows["resnet_tiny"]["imagenet"] is None

    assert main(["models", "osnet_x0_25"]) == 0
    table = capsys.readouterr().out
    assert "osnet_x0_25" in table and "osnet_x0_25_imagenet.pth" in table


def test_models_command_unknown_name(capsys):
    assert main(["models", "resnet5O"]) == 2
    assert "unknown model 'resnet5O'; known models:" in capsys.readouterr().err
