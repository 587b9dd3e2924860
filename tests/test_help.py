"""`python train.py --help`: short, the vision-language groups first, every own flag once, and nothing shown
that does not parse. The own flags are found here the way tests/test_flags.py finds them (the fields of the
three argument classes minus transformers' TrainingArguments'), not through vlm.train.help."""

from __future__ import annotations

import dataclasses
import re

import pytest
import transformers
from transformers import HfArgumentParser

from vlm.train import help as train_help
from vlm.train.arguments import DataArguments, ModelArguments, VLMTrainingArguments, parse_args

SECTIONS = (ModelArguments, DataArguments, VLMTrainingArguments)
MAX_LINES = 140  # the bound: hundreds of transformers flags no longer bury ours (HfArgumentParser: ~770 lines);
# 120 until issues 13/14 added the preference-training and evaluation groups (14 lines)
FIRST_SCREEN = 50  # lines a terminal shows at once


def _own_fields() -> list[dataclasses.Field]:
    theirs = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [f for cls in (ModelArguments, DataArguments, VLMTrainingArguments) for f in dataclasses.fields(cls)
            if not (cls is VLMTrainingArguments and f.name in theirs)]


def _entries(text: str) -> list[tuple[int, str]]:
    """(line number, flag) of every flag entry: lines that start with two spaces and the flag."""
    return [(i, m.group(1)) for i, line in enumerate(text.splitlines()) if (m := re.match(r"  (--[\w-]+)", line))]


@pytest.fixture(scope="module")
def text() -> str:
    return train_help.help_text(SECTIONS, width=100)


def test_help_is_short_and_fits_the_width(text):
    lines = text.splitlines()
    assert len(lines) < MAX_LINES, len(lines)
    assert max(len(line) for line in lines) <= 100


def test_every_own_flag_is_shown_exactly_once_with_its_aliases_as_also(text):
    flags = [flag for _, flag in _entries(text)]
    for field in _own_fields():
        assert flags.count(f"--{field.name}") == 1, field.name
        for alias in field.metadata.get("aliases", []):
            # one spelling per flag: the alias is named once, after "also:", never as an entry of its own
            assert len(re.findall(rf"{alias}\b", text)) == 1 and f"also: {alias}" in " ".join(text.split()), alias
            assert alias not in flags
    assert len(flags) == len(set(flags)), [f for f in flags if flags.count(f) > 1]


def test_vision_language_groups_come_first_and_lora_and_config_are_on_the_first_screen(text):
    lines = text.splitlines()
    transformers_header = next(i for i, line in enumerate(lines) if line.startswith("transformers TrainingArguments"))
    own = {f"--{f.name}" for f in _own_fields()}
    entries = _entries(text)
    assert all(i < transformers_header for i, flag in entries if flag in own)
    assert [flag for i, flag in entries if flag not in own and i < transformers_header] == ["--config"]
    headers = [line for line in lines if re.fullmatch(r"[a-zA-Z].*:", line)]
    assert headers[:4] == ["model:", "stages: what trains, at which learning rate:", "LoRA and QLoRA:", "data:"]
    screen = "\n".join(lines[:FIRST_SCREEN])
    for flag in ("--config FILE", "--lora_enable", "--lora_r", "--lora_rank", "--bits", "--tune_mm_mlp_adapter"):
        assert flag in screen, flag
    assert "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments" in text
    assert lines.index("examples:") > transformers_header  # examples at the end


def test_every_flag_shown_parses():
    """A flag in the help that the parser does not know would send users to an error."""
    parser = HfArgumentParser((ModelArguments, DataArguments, VLMTrainingArguments))
    known = set(parser._option_string_actions) | {"--config"}
    shown = {flag for _, flag in _entries(train_help.help_text(SECTIONS))}
    assert shown - known == set()
    for field in _own_fields():  # and every alias is still accepted (parsing unchanged)
        for alias in field.metadata.get("aliases", []):
            assert alias in known


def test_an_own_flag_missing_from_the_groups_still_shows(monkeypatch):
    monkeypatch.setattr(train_help, "GROUPS", [(title, tuple(n for n in names if n != "lora_alpha"))
                                               for title, names in train_help.GROUPS])
    lines = train_help.help_text(SECTIONS).splitlines()
    other = lines.index("other:")
    assert [line for line in lines[other:] if line.startswith("  --lora_alpha ")]


def test_help_flags_print_and_exit_zero(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--output_dir", "unused", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python train.py [--config FILE]") and "LoRA and QLoRA:" in out
    with pytest.raises(SystemExit) as info:
        parse_args(["--help-all"])
    assert info.value.code == 0
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--adam_beta1" not in out  # the full list has every transformers flag
    assert len(full.splitlines()) > 5 * len(out.splitlines())


def test_vlm_demo_help_has_a_text_and_a_default_for_every_flag():
    from vlm.demo import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 15
    for action in actions:
        assert action.help and not action.help.startswith("demo setting"), action.option_strings
        assert action.dest == "run_dir" or "(default: %(default)s)" in action.help, action.option_strings
    text = build_parser().format_help()
    assert "(default: 8000)" in text and "--threads" in text
