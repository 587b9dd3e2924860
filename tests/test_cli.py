"""Every entry point and shipped config builds and parses."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_vlm_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_modules_have_main(name):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    assert callable(module.main)


def test_unknown_subcommand(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse(stage):
    from vlm.assets import asset_path

    config = json.loads(asset_path(f"deepspeed/zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_train_py_help():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--lora_rank", "--feature_proj_lr", "--mm_projector_lr", "--pretrain_mm_mlp_adapter",
                 "--group_by_modality_length", "--image_map", "--captions_file", "--deepspeed"):
        assert flag in result.stdout


def test_shell_scripts_pass_arguments_through():
    for script in ("train.sh", "test.sh"):
        text = (REPO / script).read_text()
        assert '"$@"' in text and text.startswith("#!/usr/bin/env bash")
    assert "NPROC_PER_NODE" in (REPO / "train.sh").read_text()


def test_commands_live_in_vlm_cli():
    """One place for commands (layer 4): every subcommand's main is in vlm.cli (the demo is its own command), and
    the library packages that do the work parse no flags and have no main."""
    assert all(module.startswith("vlm.cli.") or module == "vlm.demo" for module, _ in SUBCOMMANDS.values())
    library = [REPO / "vlm" / "processing.py"] + [path for package in ("generate", "eval", "folders")
                                                  for path in sorted((REPO / "vlm" / package).glob("*.py"))]
    offenders = [str(path.relative_to(REPO)) for path in library
                 if "import argparse" in (text := path.read_text()) or "\ndef main(" in text]
    assert offenders == []
